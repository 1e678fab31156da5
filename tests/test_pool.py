import torch

from stars_deploy.distillation.pool import SyntheticPool

BATCH_MB = 16 * 1 * 8 * 8 * 4 / 2**20


def test_pool_spills_beyond_its_memory_bound_and_samples_everything(tmp_path):
    pool = SyntheticPool(tmp_path, memory_limit_mb=2.5 * BATCH_MB)
    for value in range(6):
        pool.add(torch.full((16, 1, 8, 8), float(value)))
    assert len(pool) == 96
    assert pool.spilled_chunks == 4 and pool.memory_bytes <= 2.5 * BATCH_MB * 2**20
    assert len(list(tmp_path.glob("chunk_*.pt"))) == 4
    drawn = pool.sample(3000)[:, 0, 0, 0]
    counts = torch.bincount(drawn.long(), minlength=6)
    assert int(counts.min()) > 400  # uniform over all six batches, spilled or not


def test_flush_and_restore(tmp_path):
    pool = SyntheticPool(tmp_path, memory_limit_mb=100)
    batches = [torch.randn(8, 1, 8, 8) for _ in range(3)]
    for batch in batches:
        pool.add(batch)
    pool.flush()
    restored = SyntheticPool(tmp_path, memory_limit_mb=100)
    restored.restore(pool.state())
    assert len(restored) == 24 and restored.spilled_chunks == 0
    torch.manual_seed(3)
    a = pool.sample(50)
    torch.manual_seed(3)
    assert torch.equal(restored.sample(50), a)


def test_restore_from_another_directory_reads_there_and_spills_into_its_own(tmp_path):
    # under torchrun, ranks other than 0 rebuild rank 0's pool and spill into a private directory
    source, private = tmp_path / "run_pool", tmp_path / "private"
    pool = SyntheticPool(source, memory_limit_mb=100)
    for value in range(3):
        pool.add(torch.full((16, 1, 8, 8), float(value)))
    pool.flush()
    restored = SyntheticPool(private, memory_limit_mb=1.5 * BATCH_MB)
    restored.restore(pool.state(), source=source)
    assert len(restored) == 48 and restored.spilled_chunks == 2  # read from source, not copied
    for value in (3, 4):
        restored.add(torch.full((16, 1, 8, 8), float(value)))
    # chunk 2 is already a file in source; chunk 3 is new and spills privately
    assert restored.spilled_chunks == 4 and sorted(p.name for p in private.iterdir()) == ["chunk_000003.pt"]
    assert len(list(source.iterdir())) == 3
    counts = torch.bincount(restored.sample(2500)[:, 0, 0, 0].long(), minlength=5)
    assert int(counts.min()) > 300
