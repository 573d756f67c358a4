"""Many Python threads over several wrappers, for a bounded time (KT_STRESS_SECONDS, default 3): forwards,
reloads (good ones and ones that must fail) and gpu_experts_mask replacements interleaved at random, every
forward's output checked bit for bit against a sequential run.

Each wrapper has two weight sets (A, B) and two masks; the sequential run computes, before any thread
starts, the output of every (batch, weights, mask) state on its own wrapper. During the run, mutations of
one wrapper are serialized by that wrapper's mutation lock (forwards are not: they overlap reloads and mask
changes freely), and each wrapper's state has an epoch counter bumped before and after every mutation. A
forward that saw the same even epoch before and after it must equal the sequential output of that state
exactly; one that overlapped mutations must equal the output of weights and a mask from states it could have seen
(the state before, or any installed while it waited for the compute lock: the mask is read when forward is
called, the weights when the computation runs). Anything else (a torn mask, half-loaded weights, a result from
another wrapper's weights or batch) fails.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time

import pytest
import torch

from kt_kernel import KTMoEWrapper
from moe_reference import random_experts, random_routing, wrapper_args

E, K, H, I = 8, 2, 64, 32
SECONDS = float(os.environ.get("KT_STRESS_SECONDS", "3"))
THREADS = 6


class Subject:
    """One wrapper, its weight sets, masks, batches, expected outputs and state."""

    def __init__(self, index: int, method: str):
        self.index = index
        self.method = method
        args = wrapper_args(E, K, H, I, method=method, layer_idx=index)
        if "KGroup" in method:
            args["group_size"] = 32
        self.moe = KTMoEWrapper(**args)
        self.weights = [random_experts(E, H, I, seed=100 * index + s) for s in range(2)]
        bad_gate = self.weights[0][0].clone()
        bad_gate[1, 2, 3] = float("nan")
        self.bad = (bad_gate, self.weights[0][1], self.weights[0][2])
        self.masks = [torch.zeros(E, dtype=torch.bool), torch.zeros(E, dtype=torch.bool)]
        self.masks[1][[0, 3, 5]] = True
        self.batches = [random_routing(q, H, E, K, seed=1000 * index + q) for q in (1, 5, 17)]
        # The sequential run.
        self.expected = {}
        for wi, (g, u, d) in enumerate(self.weights):
            self.moe.load_weights_from_tensors(g, u, d, None)
            for mi, mask in enumerate(self.masks):
                self.moe.gpu_experts_mask = mask
                for bi, (x, ids, w) in enumerate(self.batches):
                    self.expected[(bi, wi, mi)] = self.moe.forward(x, ids, w, None).view(torch.int16).clone()
        # Start in state (A, mask 0).
        self.moe.load_weights_from_tensors(*self.weights[0], None)
        self.moe.gpu_experts_mask = self.masks[0]
        self.state = (0, 0)
        self.pending = (0, 0)
        self.epoch = 0
        self.log = []  # (epoch at the start of a mutation, the state it installs)
        self.state_lock = threading.Lock()
        self.mutation_lock = threading.Lock()
        self.counts = {"forward": 0, "exact": 0, "reload": 0, "bad_reload": 0, "mask": 0}

    def snapshot(self):
        with self.state_lock:
            return self.epoch, self.state, self.pending

    def states_between(self, e0, e1):
        """States a forward between epochs e0 and e1 may have run with: a call waits for the compute lock,
        so several mutations may complete during it."""
        with self.state_lock:
            return {st for ep, st in self.log if e0 < ep <= e1}

    def mutate(self, next_state, action):
        """Under the wrapper's mutation lock: new = next_state(current state); action(new) applies it; the
        recorded state becomes new once action returns."""
        with self.mutation_lock:
            new = next_state(self.state)
            with self.state_lock:
                self.epoch += 1
                self.pending = new
                self.log.append((self.epoch, new))
            try:
                action(new)
            finally:
                with self.state_lock:
                    self.state = new
                    self.epoch += 1


def worker(subjects, seed: int, deadline: float, failures: list):
    rng = random.Random(seed)
    try:
        while time.monotonic() < deadline and not failures:
            s = subjects[rng.randrange(len(subjects))]
            op = rng.random()
            if op < 0.7:
                bi = rng.randrange(len(s.batches))
                x, ids, w = s.batches[bi]
                e0, st0, pend0 = s.snapshot()
                got = s.moe.forward(x, ids, w, None).view(torch.int16)
                e1, st1, pend1 = s.snapshot()
                if e0 == e1 and e0 % 2 == 0:
                    ok = torch.equal(got, s.expected[(bi,) + st0])
                    s.counts["exact"] += 1
                else:
                    # Overlapped mutations: weights and mask each from any state of the window (the state
                    # before, the one in flight at the start, any installed until the end). The two are taken
                    # at different moments: the mask when forward is called, the weights when the computation
                    # gets the compute lock, so a call queued behind a reload can pair the old mask with the
                    # new weights.
                    seen = {st0} | ({pend0} if e0 % 2 else set()) | s.states_between(e0, e1)
                    ws = {a for a, _ in seen}
                    ms = {b for _, b in seen}
                    ok = any(torch.equal(got, s.expected[(bi, wi, mi)]) for wi in ws for mi in ms)
                s.counts["forward"] += 1
                if not ok:
                    failures.append(f"wrapper {s.index} ({s.method}) batch {bi}: result matches no state it "
                                    f"could have seen (epochs {e0}..{e1}, {st0} .. {st1})")
            elif op < 0.82:
                s.mutate(lambda st: (1 - st[0], st[1]),
                         lambda new: s.moe.load_weights_from_tensors(*s.weights[new[0]], None))
                s.counts["reload"] += 1
            elif op < 0.88:
                # A reload that must fail (NaN weight for the integer methods) and change nothing.
                if s.method == "BF16":
                    continue

                def bad_reload(new):
                    try:
                        s.moe.load_weights_from_tensors(*s.bad, None)
                    except ValueError:
                        return
                    failures.append(f"wrapper {s.index}: a NaN weight was accepted")

                s.mutate(lambda st: st, bad_reload)
                s.counts["bad_reload"] += 1
            else:

                def set_mask(new):
                    s.moe.gpu_experts_mask = s.masks[new[1]]

                s.mutate(lambda st: (st[0], 1 - st[1]), set_mask)
                s.counts["mask"] += 1
    except Exception as exc:  # noqa: BLE001 - any exception is a failure of the test
        failures.append(f"{type(exc).__name__}: {exc}")


def test_threads_over_wrappers_match_the_sequential_run():
    subjects = [Subject(i, m) for i, m in enumerate(["BF16", "AMXINT8", "AMXINT4", "AMXINT4_1KGroup"])]
    for s in subjects:  # the two weight sets and masks must give different outputs, or the test is blind
        assert not torch.equal(s.expected[(1, 0, 0)], s.expected[(1, 1, 0)])
        assert not torch.equal(s.expected[(1, 0, 0)], s.expected[(1, 0, 1)])
    failures: list = []
    deadline = time.monotonic() + SECONDS
    threads = [threading.Thread(target=worker, args=(subjects, seed, deadline, failures)) for seed in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    for s in subjects:
        print(f"wrapper {s.index} {s.method}: {s.counts}")
        assert s.counts["forward"] > 0 and s.counts["reload"] > 0 and s.counts["mask"] > 0, s.counts
    # Finally each wrapper is in its recorded state exactly.
    for s in subjects:
        for bi, (x, ids, w) in enumerate(s.batches):
            assert torch.equal(s.moe.forward(x, ids, w, None).view(torch.int16), s.expected[(bi,) + s.state])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s", "-p", "no:cacheprovider"]))
