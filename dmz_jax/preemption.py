"""Stopping a training job cleanly: signals, a stop every process agrees on, lost processes.

Exit codes of `python -m dmz_jax.main` (the launchers in launch/ requeue on 75 and 76):
  0   finished (or nothing left to do);
  2   refused: bad config, absent data, another model's checkpoints, a failed restore, a
      diverged run. The message says what to do; rerunning unchanged will not help;
  75  EXIT_PREEMPTED: stopped by SIGTERM, SIGINT or SIGHUP after writing a checkpoint of the
      step it stopped at; rerun the same command to resume;
  76  EXIT_PEER_LOST: another process of a multi-process job stopped answering (killed,
      crashed, its host lost); this one exits without a new checkpoint; rerun the same
      command on every host to resume from the last checkpoint.

A signal only sets a flag (`StopSignals`); the training loop feeds every process's flag
into the next train step, which reduces them over all devices, so every process reads the
same "stop" from the step's output and checkpoints the same step. A signal that arrives
while the run is still restoring or compiling is therefore seen at the first step. A
second signal exits at once (orbax never leaves a half-written checkpoint that looks
complete).

`PeerWatchdog` (several processes): each process bumps a counter in JAX's coordination
service every few seconds; a process whose counter has not moved for `timeout` seconds, or
a coordination service that no longer answers, ends this process with EXIT_PEER_LOST and a
message naming the lost process, instead of a collective that blocks until JAX's heartbeat
(100 s) aborts it without saying why.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "try again later"
EXIT_PEER_LOST = 76
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopSignals:
    """SIGTERM, SIGINT and SIGHUP set `requested`; a second one exits at once (128 + signal).

    Use as a context manager from the main thread (elsewhere it installs nothing). Installed
    after jax.distributed.initialize, it replaces JAX's own SIGTERM notifier: the agreement
    on the stop step is the train step's reduction of every process's flag (see the module
    docstring), which needs no preemption sync point.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        if self.requested:
            logging.warning("Second signal %d: exiting now without a checkpoint.", signum)
            os._exit(128 + signum)
        self.requested = True
        logging.warning("Signal %d: finishing this step, checkpointing and exiting.", signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _exit_peer_lost(message: str) -> None:
    logging.error("%s", message)
    print(f"\nERROR: {message}", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(EXIT_PEER_LOST)  # no atexit: JAX's shutdown barrier would wait for the lost one


class PeerWatchdog:
    """Ends this process with EXIT_PEER_LOST when another process of the job is lost.

    Every `interval` seconds the thread increments key PREFIX/<this process> in JAX's
    coordination service and reads every other process's key; a key that has not changed
    for `timeout` seconds (this process's clock only: no clock is compared across hosts)
    names a lost process. A process that finished cleanly writes "done" (`stop`) and is
    never counted as lost. `client` is JAX's distributed runtime client (anything with
    key_value_set(key, value, allow_overwrite=...) and key_value_dir_get(prefix)).
    """

    PREFIX = "dmz_jax_alive"

    def __init__(self, client, process_index: int, process_count: int, *,
                 timeout: float = 60.0, interval: float = 2.0,
                 on_lost: Callable[[str], None] = _exit_peer_lost):
        self.client, self.index, self.count = client, process_index, process_count
        self.timeout, self.interval, self.on_lost = timeout, interval, on_lost
        self._stopped = threading.Event()
        self._beats = 0
        self._seen: dict[int, tuple[str, float]] = {}  # process -> (value, when it changed)
        self._thread = threading.Thread(target=self._run, name="dmz-peer-watchdog",
                                        daemon=True)

    def start(self) -> "PeerWatchdog":
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        """This process is done (finished, refused or preempted): never report it lost."""
        self._stopped.set()
        try:
            self.client.key_value_set(self._key(self.index), "done", allow_overwrite=True)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass

    def exit_after_failure(self) -> None:
        """Called on an unexpected exception: a collective with a lost process fails at
        once on some backends (gloo) but the loss shows here only after `timeout`; wait for
        that verdict (exit 76), else print the exception and exit 1, skipping JAX's shutdown
        barrier (the other processes would wait in it for this one)."""
        import traceback
        logging.error("Process %d failed; waiting up to %.0f s to see whether another "
                      "process was lost:\n%s", self.index, self.timeout + 3 * self.interval,
                      traceback.format_exc())
        self._thread.join(self.timeout + 3 * self.interval)  # on_lost exits the process
        self._stopped.set()
        traceback.print_exc()
        logging.shutdown()
        os._exit(1)

    def _key(self, index: int) -> str:
        return f"{self.PREFIX}/{index}"

    def _beat(self) -> None:
        self._beats += 1
        self.client.key_value_set(self._key(self.index), str(self._beats),
                                  allow_overwrite=True)

    def lost(self, now: float) -> list[int]:
        """The processes whose counter has not moved for `timeout` seconds at `now`."""
        values = dict(self.client.key_value_dir_get(self.PREFIX + "/"))
        lost = []
        for j in range(self.count):
            if j == self.index:
                continue
            value = values.get(self._key(j), "")
            old = self._seen.get(j)
            if old is None or old[0] != value:
                self._seen[j] = (value, now)
            elif value != "done" and now - old[1] > self.timeout:
                lost.append(j)
        return lost

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self._beat()
                lost = self.lost(time.monotonic())
            except Exception as e:  # noqa: BLE001 - the service itself is gone
                if self._stopped.is_set():
                    return
                self.on_lost(f"Lost contact with JAX's coordination service (process 0) "
                             f"from process {self.index}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300] if str(e) else ''}. Process 0 "
                             f"was probably killed or its host lost. Exiting with code "
                             f"{EXIT_PEER_LOST}; rerun the same command on every host to "
                             "resume from the last checkpoint.")
                return
            if lost and not self._stopped.is_set():
                names = ", ".join(str(j) for j in lost)
                self.on_lost(f"Process {names} of {self.count} stopped answering (no sign of "
                             f"life for {self.timeout:.0f} s; killed, crashed or its host "
                             f"lost). Process {self.index} exits with code {EXIT_PEER_LOST} "
                             "without a new checkpoint; rerun the same command on every "
                             "host to resume from the last checkpoint.")
                return


def start_watchdog(timeout: float) -> Optional[PeerWatchdog]:
    """A started PeerWatchdog when this is one of several processes, else None."""
    import jax
    if jax.process_count() == 1:
        return None
    from jax._src import distributed  # the client jax.distributed.initialize made
    return PeerWatchdog(distributed.global_state.client, jax.process_index(),
                        jax.process_count(), timeout=timeout).start()
