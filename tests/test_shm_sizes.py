"""The ivshmem backing file the model creates must hold what the engine allocates in it."""

from iosm_cuse.bus.shm import ShmLayout
from iosm_cuse.sim.process import DEFAULT_SHM_SIZE
from iosm_cuse.wire.channels import MuxMode, dma_bytes_needed


def test_default_modem_file_fits_both_mux_modes() -> None:
    layout = ShmLayout.single_file(DEFAULT_SHM_SIZE)
    for mode in MuxMode:
        assert layout.dma.size >= dma_bytes_needed((0, 6), mode), mode
    assert DEFAULT_SHM_SIZE & (DEFAULT_SHM_SIZE - 1) == 0  # QEMU's ivshmem: power of two
