"""flow.dataset() under torch's DataLoader and torchdata's StatefulDataLoader, and flows.Loader
where a StatefulDataLoader is expected."""

import pytest
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from flows import Flow, FlowsError
from flows.testing import assert_same, check_resume, run_epochs

pytestmark = pytest.mark.filterwarnings("ignore:.*(set_vital|worker processes in total).*:UserWarning")

N = 10


def flow(batch: int | None = 2) -> Flow:
    base = Flow.items([{"x": i} for i in range(N)]).shuffle(seed=1)
    return base.batch(batch) if batch else base


def xs(batches: list) -> list[list[int]]:
    return [b["x"].tolist() for b in batches]


@pytest.mark.parametrize(("loader_class", "workers", "persistent"), [
    (DataLoader, 0, False), (DataLoader, 2, False), (DataLoader, 4, True),
    (StatefulDataLoader, 1, False), (StatefulDataLoader, 2, True), (StatefulDataLoader, 4, False)])
def test_flows_batching_gives_the_loaders_batches_for_any_workers(loader_class, workers, persistent):
    reference = xs(run_epochs(flow().loader(), 3))
    dataset = flow().dataset()
    loader = loader_class(dataset, batch_size=None, num_workers=workers, persistent_workers=persistent)
    assert len(loader) == 5
    assert xs(run_epochs(loader, 3)) == reference  # epochs advance, persistent workers or not
    assert dataset.epoch == 3


@pytest.mark.parametrize(("workers", "persistent"), [(0, False), (2, False), (3, True)])
def test_dataloader_batching_gives_each_sample_once_per_epoch_over_ranks(workers, persistent):
    epochs = [[], []]
    for rank in range(2):
        loader = DataLoader(flow(None).dataset(rank=rank, world_size=2), batch_size=2,
                            num_workers=workers, persistent_workers=persistent)
        for epoch in epochs:
            epoch.append([x for b in loader for x in b["x"].tolist()])
    for epoch in epochs:
        assert sorted(epoch[0] + epoch[1]) == list(range(N))  # each sample once, over both ranks
    assert epochs[0] != epochs[1]  # a new order each epoch


def test_spawned_workers_share_the_epoch():
    reference = xs(run_epochs(flow().loader(), 2))
    dataset = flow().dataset()
    loader = DataLoader(dataset, batch_size=None, num_workers=2, persistent_workers=True,
                        multiprocessing_context="spawn")  # the dataset is pickled, not forked
    assert xs(run_epochs(loader, 2)) == reference
    dataset.set_epoch(0)
    assert xs(loader) == reference[:5]


def test_set_epoch_picks_the_epoch_like_distributed_sampler():
    reference = xs(run_epochs(flow().loader(), 3))
    dataset = flow().dataset()
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    dataset.set_epoch(2)
    assert xs(loader) == reference[10:]
    dataset.set_epoch(1)
    assert xs(loader) == reference[5:10]
    assert xs(loader) == reference[10:]  # and on from there


@pytest.mark.parametrize(("workers", "persistent"), [(0, False), (1, False), (2, False), (2, True),
                                                     (4, False)])
def test_stateful_dataloader_resumes_with_the_next_batch(workers, persistent):
    def build():
        return StatefulDataLoader(flow().dataset(), batch_size=None, num_workers=workers,
                                  persistent_workers=persistent)

    # restore points: start, one batch, mid-epoch, into the next epoch (epoch ends: below)
    check_resume(build, points=[0, 1, 2, 6], epochs=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_resumes_with_dataloader_batching(workers):
    check_resume(lambda: StatefulDataLoader(flow(None).dataset(), batch_size=3, num_workers=workers),
                 points=[0, 1, 2, 5], epochs=2)


@pytest.mark.parametrize("finished", [False, True])
@pytest.mark.parametrize(("workers", "persistent"), [(0, False), (1, False), (2, False), (2, True),
                                                     (4, False)])
def test_a_state_saved_at_the_epoch_end_resumes_with_the_next_epoch(workers, persistent, finished):
    reference = xs(run_epochs(flow().loader(), 2))
    first = StatefulDataLoader(flow().dataset(), batch_size=None, num_workers=workers,
                               persistent_workers=persistent)
    seen = []
    for batch in first:
        seen.append(batch["x"].tolist())
        state = first.state_dict()  # after the last batch: the iterator has not finished yet
    assert seen == reference[:5]
    if finished:
        state = first.state_dict()
    resumed = StatefulDataLoader(flow().dataset(), batch_size=None, num_workers=workers,
                                 persistent_workers=persistent)
    resumed.load_state_dict(state)
    if not finished:  # as with any StatefulDataLoader: the (empty) rest of the epoch, then the next
        assert xs(resumed) == []
    assert xs(resumed) == reference[5:]


def test_another_worker_count_is_refused_with_the_way_out():
    first = StatefulDataLoader(flow().dataset(), batch_size=None, num_workers=2)
    it = iter(first)
    next(it)
    state = first.state_dict()
    other = StatefulDataLoader(flow().dataset(), batch_size=None, num_workers=3)
    other.load_state_dict(state)
    refused = r"saved by DataLoader worker \d of 2, not \d of 3.*use flows\.Loader"
    with pytest.raises(FlowsError, match=refused):
        next(iter(other))


def test_a_flows_loader_goes_where_a_stateful_dataloader_is_expected():
    loader = flow(4).loader(num_workers=2)
    assert (loader.batch_size, loader.num_workers, len(loader), len(loader.dataset)) == (4, 2, 3, N)
    assert flow(None).loader().batch_size is None  # samples, as a DataLoader with batch_size=None
    assert flow(4).bucket(1.0, duration="x").loader().batch_size is None  # sizes vary
    with loader:
        state = loader.state_dict()
    stateful = StatefulDataLoader(flow(4).dataset(), batch_size=None, num_workers=0)
    next(iter(stateful))
    with pytest.raises(FlowsError, match="got a torchdata StatefulDataLoader state"):
        loader.load_state_dict(stateful.state_dict())
    dataset = flow(4).dataset()
    with pytest.raises(FlowsError, match="flows.Loader state, not a FlowDataset's"):
        dataset.load_state_dict(state)
    iter(dataset)
    with pytest.raises(FlowsError, match="got a FlowDataset state"):
        loader.load_state_dict(dataset.state_dict())


def test_a_device_flow_is_refused():
    with pytest.raises(FlowsError, match="drop .to()"):
        flow().to("cpu", transform=torch.neg).dataset()


def test_every_output_of_the_dataset_is_the_loaders_in_the_main_process():
    reference = run_epochs(flow().loader(), 2)
    dataset = flow().dataset()
    for a, b in zip(run_epochs(dataset, 2), reference, strict=True):
        assert_same(a, b)


def test_an_iter_never_advanced_takes_no_epoch():
    reference = xs(run_epochs(flow().loader(), 2))
    loader = flow().loader()
    iter(loader)  # as Lightning does, to check that a loader is iterable
    assert xs(run_epochs(loader, 2)) == reference
