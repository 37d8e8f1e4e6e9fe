import logging

import torch

from mcl.montage_streams import GENERATOR_STATES, MontageStream, montage_seed

CPU = torch.device("cpu")


def test_a_stream_starts_from_the_seed_and_rank_and_reseeds():
    stream = MontageStream(3)
    assert stream.generator(CPU).initial_seed() == montage_seed(3, 0) == 3 * 1_000_003
    first = torch.rand(4, generator=stream.generator(CPU))
    stream.reseed(7)
    assert torch.equal(
        torch.rand(4, generator=stream.generator(CPU)), torch.rand(4, generator=torch.Generator().manual_seed(7))
    )
    stream.reseed()
    assert torch.equal(torch.rand(4, generator=stream.generator(CPU)), first)


def test_saved_states_resume_where_they_were_held():
    stream = MontageStream(0)
    torch.rand(3, generator=stream.generator(CPU))
    checkpoint = {"global_step": 5}
    stream.save(checkpoint, CPU)
    assert checkpoint[GENERATOR_STATES].shape[0] == 1
    expected = torch.rand(3, generator=stream.generator(CPU))
    resumed = MontageStream(0)
    resumed.hold(checkpoint)
    resumed.resume(CPU)
    assert torch.equal(torch.rand(3, generator=resumed.generator(CPU)), expected)
    resumed.resume(CPU)  # once only: nothing held any more
    assert not torch.equal(torch.rand(3, generator=resumed.generator(CPU)), expected)


def test_states_of_another_world_size_restart_from_seed_rank_and_step(caplog):
    stream = MontageStream(5)
    two_ranks = torch.stack([stream.generator(CPU).get_state()] * 2)
    with caplog.at_level(logging.WARNING, logger="mcl.montage_streams"):
        stream.restore(two_ranks, 40, CPU)
    assert "holds 2 rank(s)' states for 1 rank(s)" in caplog.text
    expected = torch.Generator().manual_seed(montage_seed(5, 0, 40))
    assert torch.equal(stream.generator(CPU).get_state(), expected.get_state())
