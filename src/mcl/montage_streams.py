"""Montage randomness: one generator per rank, seeded from the run's seed and the rank, saved in checkpoints with
every rank's state and continued on resume. No Lightning."""

from __future__ import annotations

import hashlib
import logging

import torch

from mcl.distributed import gather_batch, rank, world_size

log = logging.getLogger(__name__)
# Checkpoint key of the montage generators' states, one row per rank.
GENERATOR_STATES = "montage_generator_states"


def montage_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of a rank's montage stream: a run's ``seed`` and the process's ``rank`` at the start, and the
    ``step`` when a resume has to derive it anew (:meth:`MontageStream.restore`). Below 2**32: the CPU generator
    keeps only the lower 32 bits of a seed."""
    if step == 0:
        return seed * 1_000_003 + rank
    return int.from_bytes(hashlib.blake2b(f"{seed},{rank},{step}".encode(), digest_size=4).digest(), "little")


class MontageStream:
    """This rank's montage generator, made on first use on the device that asks for it.

    Args:
        seed: the run's seed; the stream starts from :func:`montage_seed` of it and this process's rank.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._explicit_seed: int | None = None
        self._generator: torch.Generator | None = None
        self._held: tuple[torch.Tensor | None, int] | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The stream's generator on ``device`` (made anew, from the seed, when it lives elsewhere)."""
        if self._generator is None or self._generator.device != device:
            seed = montage_seed(self.seed, rank()) if self._explicit_seed is None else self._explicit_seed
            self._generator = torch.Generator(device=device).manual_seed(seed)
        return self._generator

    def reseed(self, seed: int | None = None) -> None:
        """Restart the draws: from ``seed``, or by default from the run's seed and this rank."""
        self._explicit_seed = seed
        self._generator = None

    def save(self, checkpoint: dict, device: torch.device) -> None:
        """Every rank's generator state into ``checkpoint``, one row per rank, on the CPU (every rank must call this:
        the states are gathered)."""
        checkpoint[GENERATOR_STATES] = gather_batch(self.generator(device).get_state().to(device).unsqueeze(0)).cpu()

    def hold(self, checkpoint: dict) -> None:
        """Keep a checkpoint's states and step for :meth:`resume` (when fitting starts, on the device it runs on)."""
        self._held = (checkpoint.get(GENERATOR_STATES), int(checkpoint.get("global_step", 0)))

    def resume(self, device: torch.device) -> None:
        """:meth:`restore` what :meth:`hold` kept, once; nothing if it kept nothing."""
        held, self._held = self._held, None
        if held is not None:
            self.restore(*held, device)

    def restore(self, states: torch.Tensor | None, step: int, device: torch.device) -> None:
        """Continue this rank's stream from a checkpoint's ``states`` (one row per rank that saved it). Saved by
        another number of ranks (or on another device type, or not at all), each rank's stream is derived anew from
        ``(seed, rank, step)`` instead, with a warning: independent across ranks, but not the draws an uninterrupted
        run would have made."""
        here, ranks = rank(), world_size()
        generator = self.generator(device)
        if states is not None and len(states) == ranks and states[here].numel() == generator.get_state().numel():
            generator.set_state(states[here].clone())
            return
        why = (
            "the checkpoint has none"
            if states is None
            else f"it holds {len(states)} rank(s)' states for {ranks} rank(s) now"
            if len(states) != ranks
            else "they were saved on another device type"
        )
        log.warning(
            "montage generators restarted from (seed, rank, step=%d) on resume: %s; the ranks' cell layouts stay "
            "independent but differ from those of an uninterrupted run",
            step,
            why,
        )
        generator.manual_seed(montage_seed(self.seed, here, step))
