"""The host-sync census counts every kind of read it names, and nothing else."""

import torch

from moe_dist.common.host_sync import HostSyncCensus, allowed


def test_counts_each_kind_of_host_read():
    x = torch.arange(6)
    with HostSyncCensus() as census:
        x[0].item(); x.tolist(); x.cpu(); x.numpy()
        bool(x[1]); float(x[1]); int(x[1]); range(x[2])
        if x.sum():
            pass
        torch.bincount(x); x.nonzero(); torch.unique(x); torch.masked_select(x, x > 2)
        x[x > 2]; x[x > 2] = 0
        torch.repeat_interleave(x, x)
        torch.tensor([1, 2]); x.new_tensor([3]); torch.as_tensor([4])
    expected = {"item": 1, "tolist": 1, "cpu": 1, "numpy": 1, "__bool__": 2, "__float__": 1, "__int__": 1,
                "__index__": 1, "bincount": 1, "nonzero": 1, "unique": 1, "masked_select": 1,
                "boolean-mask indexing": 2, "repeat_interleave without output_size": 1,
                "tensor from host data": 3}
    assert dict(census.kinds) == expected
    assert all("test_host_sync" not in place for place in census.where)  # lines outside moe_dist


def test_device_work_and_allowed_reads_are_not_counted():
    x = torch.arange(6, dtype=torch.float32, requires_grad=True)
    with HostSyncCensus() as census:
        counts = torch.zeros(3).scatter_add_(0, torch.tensor([0, 1, 1]).clone(), torch.ones(3))
        y = (x * 2).cumsum(0)
        torch.repeat_interleave(x.detach(), torch.full((6,), 2), output_size=12)
        x[torch.tensor([0, 2])]
        with allowed():
            counts.tolist()
        y.sum().backward()
    assert dict(census.kinds) == {"tensor from host data": 2}  # the two index lists above
