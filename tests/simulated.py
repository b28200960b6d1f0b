"""W simulated ranks in one process: one thread per rank, an in-memory SUM allreduce.

The kernels release the GIL, so the ranks really run concurrently, and every
collective is a rendezvous of all W threads, like a real one. What a real job
would do silently or by hanging is turned into an exception here:

* a rank that returns (or raises) while the others wait in a collective
  breaks the rendezvous: the others raise :class:`RankGone` at once instead of
  hanging (a real job would hang in that collective);
* buffers of different sizes in one allreduce raise :class:`CollectiveMismatch`
  on every rank (MPI calls that erroneous; it may hang, truncate or mix data).

Usage::

    def step(rank, comm):
        bn = SyncBatchNorm(3, process_group=comm)
        return bn(shards[rank])

    outputs = run_ranks(4, step)          # [output of rank 0, ..., rank 3]
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional, TypeVar

import torch

from syncbn.comm import Communicator

__all__ = [
    "CollectiveMismatch",
    "RankGone",
    "SimulatedCommunicator",
    "SimulatedWorld",
    "run_ranks",
]

T = TypeVar("T")

#: seconds a rank waits for the others in one collective before giving up
DEFAULT_TIMEOUT = 60.0


class RankGone(RuntimeError):
    """A rank left (returned or raised) while others were in, or later entered, a collective."""


class CollectiveMismatch(RuntimeError):
    """The ranks entered one collective with different buffer sizes."""


class _Rendezvous:
    """A reusable barrier with generations, a ``threading.Barrier`` without its abort race.

    ``threading.Barrier.abort()`` also breaks waiters whose generation has
    already been released but who have not yet woken up, so a rank raising
    right after a collective could make a peer that completed the same
    collective raise ``BrokenBarrierError``. Here a wait that was released
    always returns, whatever happens afterwards.
    """

    def __init__(self, parties: int, timeout: float) -> None:
        self.parties = parties
        self.timeout = timeout
        self._cond = threading.Condition()
        self._arrived = 0
        self._generation = 0
        self._broken: Optional[BaseException] = None

    def wait(self) -> None:
        with self._cond:
            if self._broken is not None:
                raise RankGone(str(self._broken)) from self._broken
            gen = self._generation
            self._arrived += 1
            if self._arrived == self.parties:
                self._arrived = 0
                self._generation += 1
                self._cond.notify_all()
                return
            released = self._cond.wait_for(
                lambda: self._generation != gen or self._broken is not None, self.timeout)
            if self._generation != gen:
                return
            if not released:
                self._broken = TimeoutError(
                    f"simulated collective: {self.parties - self._arrived} of "
                    f"{self.parties} ranks did not arrive within {self.timeout} s")
                self._cond.notify_all()
            raise RankGone(str(self._broken)) from self._broken

    def abort(self, reason: BaseException) -> None:
        with self._cond:
            if self._broken is None:
                self._broken = reason
            self._cond.notify_all()


class SimulatedWorld:
    """Shared state of W simulated ranks: the deposits and the rendezvous."""

    def __init__(self, size: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        if size < 1:
            raise ValueError(f"SimulatedWorld: expected size >= 1 (got {size})")
        self.size = size
        self.rendezvous = _Rendezvous(size, timeout)
        self._deposits: list[Optional[torch.Tensor]] = [None] * size
        self.comms = [SimulatedCommunicator(self, r) for r in range(size)]

    def allreduce(self, rank: int, buf: torch.Tensor) -> None:
        self._deposits[rank] = buf.clone()
        self.rendezvous.wait()
        deposits = list(self._deposits)
        sizes = [d.numel() if d is not None else -1 for d in deposits]
        mismatch = len(set(sizes)) > 1
        if not mismatch:
            # the same additions in the same (rank) order on every rank:
            # bit-identical results everywhere, like a real allreduce
            acc = deposits[0].clone()
            for d in deposits[1:]:
                acc += d
        # nobody may deposit the next buffer before everyone has read this one
        self.rendezvous.wait()
        if mismatch:
            raise CollectiveMismatch(
                "simulated allreduce: the ranks passed buffers of different sizes "
                f"{sizes} (rank order)")
        buf.copy_(acc)

    def leave(self, rank: int, error: Optional[BaseException]) -> None:
        """Rank ``rank`` is done: no collective can complete any more."""
        if self.size == 1:
            return
        what = "returned" if error is None else f"raised {type(error).__name__}: {error}"
        self.rendezvous.abort(RankGone(
            f"rank {rank} {what} while other ranks were in, or still had to enter, "
            "a collective (a real job would hang there)"))


class SimulatedCommunicator(Communicator):
    """Rank ``rank`` of a :class:`SimulatedWorld`: SUM allreduce through shared memory."""

    name = "simulated"

    def __init__(self, world: SimulatedWorld, rank: int) -> None:
        super().__init__()
        self.world = world
        self._rank = rank
        #: number of elements of every allreduce this rank issued, in order
        self.sizes: list[int] = []

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self.world.size

    def _allreduce(self, buf: torch.Tensor) -> None:
        self.sizes.append(buf.numel())
        if self.world.size > 1:
            self.world.allreduce(self._rank, buf)


def run_ranks(
    size: int,
    fn: Callable[[int, SimulatedCommunicator], T],
    *,
    return_exceptions: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Any]:
    """Run ``fn(rank, comm)`` for every rank in its own thread; return the results by rank.

    By default the first exception raised by any rank (in time order) is
    re-raised here, after every thread has finished: the other ranks see
    the rendezvous break (:class:`RankGone`) instead of waiting forever.
    With ``return_exceptions=True`` the list holds each rank's result or
    exception, so tests can check that every rank raised the same error.
    """
    world = SimulatedWorld(size, timeout)
    results: list[Any] = [None] * size
    errors: list[tuple[int, BaseException]] = []
    lock = threading.Lock()

    def target(rank: int) -> None:
        error: Optional[BaseException] = None
        try:
            results[rank] = fn(rank, world.comms[rank])
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            error = exc
            results[rank] = exc
            with lock:
                errors.append((rank, exc))
        finally:
            world.leave(rank, error)

    threads = [threading.Thread(target=target, args=(r,), name=f"sim-rank-{r}", daemon=True)
               for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        # every wait inside is bounded by `timeout`; this bound only guards
        # against a rank stuck outside any collective
        t.join(timeout + 60.0)
        if t.is_alive():
            raise TimeoutError(f"run_ranks: {t.name} did not finish")
    if errors and not return_exceptions:
        raise errors[0][1]
    return results
