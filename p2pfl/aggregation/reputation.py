"""Per-neighbour reputation of rule "robust": trust built from evidence across rounds (class Reputation).

A neighbour that keeps sending vectors far from the node's own model, relative to the node's other
neighbours (a BALANCE-style distance test, Fang et al. 2024, here relative to the median distance,
which is capped at a few of the node's own training steps so that a Byzantine majority around a node
cannot inflate it), that keeps sending the same vector (a replayed stale model), or that keeps being
clipped, loses weight within a few rounds; a neighbour that behaves again regains weight slowly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from p2pfl.aggregation.weights import ADAPTIVE_SLACK, median_reference, upper_median
from p2pfl.errors import ConfigError

REPUTATION_ACCEPT = 3.0  # distance test: d_j <= accept * median distance passes
REPUTATION_PENALTY = 0.5  # score multiplier for a failed round
REPUTATION_RECOVERY = 0.05  # score added per clean round (passed and not clipped): 0 -> 1 in 20 rounds
REPUTATION_WINDOW = 8  # rounds of clipped / failed flags remembered per neighbour
REPUTATION_PERSISTENT = 0.75  # clipped in >= 3/4 of a full window counts as persistent clipping ...
REPUTATION_PERSISTENT_CAP = 0.5  # ... which caps the score at this value
REPUTATION_MIN_NEIGHBOURS = 3  # clipping counts as evidence only with this many neighbours in the round
REPUTATION_SKETCH = 128  # coordinates kept per neighbour to see whether its vector changed (0: off)
REPUTATION_STALE = 0.1  # changed less than this fraction of the median change since last round: stale
REPUTATION_STEP_CAP = 4.0  # the reference distance is at most this many own training steps (0: off)
REPUTATION_MAX_TRACKED = 1024  # neighbours remembered (least recently seen forgotten first)
_SKETCH_SEED = 0x5EED


@functools.lru_cache(maxsize=16)
def sketch_index(size: int, k: int = REPUTATION_SKETCH) -> np.ndarray:
    """The k coordinates (sorted) of a size-P vector a Reputation remembers: fixed for a given P, so
    every node, and mix and mix_many, pick the same ones."""
    if size <= k:
        return np.arange(size, dtype=np.int64)
    rng = np.random.default_rng([_SKETCH_SEED, size, k])
    return np.sort(rng.choice(size, k, replace=False)).astype(np.int64)


@dataclass
class _Record:
    score: float
    seen: int = 0  # rounds with evidence
    failures: int = 0  # failed rounds, ever
    clipped_bits: int = 0  # bit k set: clipped k rounds ago (last `window` rounds of evidence)
    failed_bits: int = 0  # bit k set: failed a test k rounds ago
    stale_bits: int = 0  # bit k set: vector unchanged k rounds ago
    ratio: float = 0.0  # last distance / median distance (inf: unusable vector)
    last: int = 0  # Reputation.rounds when last seen
    sketch: np.ndarray | None = None  # the neighbour's last vector at sketch_index(P)


def _bits(mask: int) -> int:
    return bin(mask).count("1")


class Reputation:
    """One node's per-neighbour trust, built from evidence across rounds (rule "robust").

    Every round the node calls `update` (mix does it for rule "robust") with the distance of each
    neighbour's vector from the node's own model. The evidence of one round, for neighbour j:

    - ratio_j = d_j / m, m = upper median of {0} U {finite d_k} (the node itself votes at 0, so m is
      an honest distance while fewer than half the votes are outliers), capped at step_cap times
      the node's own training step of the round (||own - its last mixed model||, from sketches:
      in honest runs m is 0.8..4 steps, and the cap keeps m honest when most neighbours are
      Byzantine): the distance relative to the others;
    - distance test (BALANCE-style, relative to the median): pass iff ratio_j <= accept. With gamma
      set, also the original BALANCE test (Fang et al. 2024): d_j <= gamma * exp(-kappa t / horizon)
      * ||x_i|| (t = this node's round count), which needs a horizon and a model scale, hence off by
      default;
    - staleness (with sketches, which mix passes): j's vector did not change at all since its last
      round, or by at most `stale` x the median change of {own} U {neighbours} (sampled on `sketch`
      fixed coordinates): a node that trains changes its model every round, one replaying an old
      model does not;
    - clipped_j: d_j > radius (the clipping radius of the round), counted only in rounds with at
      least min_neighbours usable neighbours (with two, the radius follows the nearer one, and
      being the farther of two honest neighbours says nothing).

    The score s_j (starts at `initial`, 1 = full MH weight) then moves:
    failed distance test, stale, or unusable vector -> s_j *= penalty (0.5: under 0.13 after 3
    rounds); otherwise, clipped in >= persistent of the last `window` rounds (with a full window)
    -> s_j = min(s_j, persistent_cap); otherwise, not clipped -> s_j += recovery (slowly, 0.05 a
    round), capped at 1; clipped now and then -> unchanged. A neighbour that did not arrive gives no
    evidence. If m is 0 (half the votes equal the node's own model) the distances give no evidence.

    Pure and deterministic; memory is bounded by max_tracked records of a few numbers and `sketch`
    floats each (the least recently seen neighbour is dropped first). `forget(node_id)` drops one
    neighbour (e.g. when it leaves the federation; if it comes back it starts again at `initial`).
    """

    def __init__(
        self,
        accept: float = REPUTATION_ACCEPT,
        penalty: float = REPUTATION_PENALTY,
        recovery: float = REPUTATION_RECOVERY,
        window: int = REPUTATION_WINDOW,
        persistent: float = REPUTATION_PERSISTENT,
        persistent_cap: float = REPUTATION_PERSISTENT_CAP,
        initial: float = 1.0,
        min_neighbours: int = REPUTATION_MIN_NEIGHBOURS,
        sketch: int = REPUTATION_SKETCH,
        stale: float = REPUTATION_STALE,
        step_cap: float = REPUTATION_STEP_CAP,
        gamma: float | None = None,
        kappa: float = 1.0,
        horizon: int = 100,
        max_tracked: int = REPUTATION_MAX_TRACKED,
    ) -> None:
        checks = [
            (accept > 0, "accept must be > 0"),
            (0 <= penalty < 1, "penalty must be in [0, 1)"),
            (0 <= recovery <= 1, "recovery must be in [0, 1]"),
            (isinstance(window, int) and 1 <= window <= 64, "window must be an integer in 1..64"),
            (0 < persistent <= 1, "persistent must be in (0, 1]"),
            (0 <= persistent_cap <= 1, "persistent_cap must be in [0, 1]"),
            (0 <= initial <= 1, "initial must be in [0, 1]"),
            (
                isinstance(min_neighbours, int) and min_neighbours >= 1,
                "min_neighbours must be an integer >= 1",
            ),
            (isinstance(sketch, int) and sketch >= 0, "sketch must be an integer >= 0 (0: off)"),
            (0 <= stale < 1, "stale must be in [0, 1)"),
            (step_cap >= 0, "step_cap must be >= 0 (0: off)"),
            (gamma is None or gamma > 0, "gamma must be > 0 (or None: no absolute BALANCE test)"),
            (kappa >= 0 and horizon >= 1, "kappa must be >= 0 and horizon >= 1"),
            (isinstance(max_tracked, int) and max_tracked >= 1, "max_tracked must be an integer >= 1"),
        ]
        for ok, why in checks:
            if not ok:
                raise ConfigError(f"reputation: {why}")
        self.accept, self.penalty, self.recovery = float(accept), float(penalty), float(recovery)
        self.window, self.persistent, self.persistent_cap = window, float(persistent), float(persistent_cap)
        self.initial, self.sketch, self.stale = float(initial), sketch, float(stale)
        self.min_neighbours = min_neighbours
        self.step_cap = float(step_cap)
        self.gamma, self.kappa, self.horizon = gamma, float(kappa), int(horizon)
        self.max_tracked = max_tracked
        self.rounds = 0  # update() calls so far
        self._records: dict[str, _Record] = {}
        self._own_sketch: np.ndarray | None = None
        self._out_sketch: np.ndarray | None = None  # sketch of the node's last mixed model

    @property
    def needs_norm(self) -> bool:
        """True when update() needs own_norm (the absolute BALANCE test is on)."""
        return self.gamma is not None

    def sketch_of(self, vector: np.ndarray) -> np.ndarray | None:
        """The coordinates of `vector` this Reputation compares across rounds (None: sketches off)."""
        if not self.sketch:
            return None
        v = np.asarray(vector)
        return v[sketch_index(v.size, self.sketch)].astype(np.float32)

    def remember_output(self, vector: np.ndarray) -> None:
        """Keep the sketch of this round's mixed model (mix does it), to measure the next training step."""
        if self.sketch and self.step_cap:
            self._out_sketch = self.sketch_of(vector)

    def own_step(self, own: np.ndarray) -> float | None:
        """Estimated ||own - the node's last mixed model||: how far local training moved it this round,
        from the sketch (scaled by sqrt(P / sketch)); None before the first output or when off."""
        if not (self.sketch and self.step_cap) or self._out_sketch is None:
            return None
        v = np.asarray(own)
        idx = sketch_index(v.size, self.sketch)
        if self._out_sketch.shape != idx.shape:
            return None
        with np.errstate(over="ignore", invalid="ignore"):
            step = float(np.linalg.norm(v[idx].astype(np.float64) - self._out_sketch)) * math.sqrt(
                v.size / idx.size
            )
        return step if math.isfinite(step) and step > 0 else None

    def reference(self, distances: Sequence[float], own_step: float | None = None) -> float:
        """The distance scale of the round: the upper median of {0} U {finite distances}, capped at
        step_cap x own_step (a scale the neighbours cannot inflate, for a node most of whose
        neighbours are Byzantine)."""
        m = median_reference(distances)
        if own_step is not None and self.step_cap and own_step > 0:
            m = min(m, self.step_cap * own_step)
        return m

    def radius(self, distances: Sequence[float], own_step: float | None = None) -> float:
        """The adaptive clipping radius of rule "robust": ADAPTIVE_SLACK x reference."""
        return ADAPTIVE_SLACK * self.reference(distances, own_step)

    def score(self, node_id: str) -> float:
        """The neighbour's current score (`initial` for one never seen)."""
        rec = self._records.get(node_id)
        return self.initial if rec is None else rec.score

    def scores(self) -> dict[str, float]:
        """Every tracked neighbour's score."""
        return {nid: rec.score for nid, rec in self._records.items()}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._records

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What a checkpoint keeps: the records as plain values, and the sketches as arrays."""
        records = {
            nid: {k: v for k, v in asdict(r).items() if k != "sketch"} for nid, r in self._records.items()
        }
        arrays = {f"sketch/{nid}": r.sketch for nid, r in self._records.items() if r.sketch is not None}
        if self._out_sketch is not None:
            arrays["out_sketch"] = self._out_sketch
        return {"rounds": self.rounds, "records": records}, arrays

    def restore(self, values: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Load what `state` returned (a node resuming from its checkpoint)."""
        self.rounds = int(values["rounds"])
        self._records = {
            nid: _Record(**fields, sketch=arrays.get(f"sketch/{nid}"))
            for nid, fields in values["records"].items()
        }
        self._out_sketch = arrays.get("out_sketch")

    def forget(self, node_id: str) -> None:
        """Drop what is known about one neighbour (no error if unknown)."""
        self._records.pop(node_id, None)

    def reason(self, node_id: str) -> str:
        """Short human-readable evidence: "distance 8.3x median, clipped 4/5 rounds, failed 4/5"."""
        rec = self._records.get(node_id)
        if rec is None:
            return "unknown"
        n = min(rec.seen, self.window)
        ratio = "unusable vector" if not math.isfinite(rec.ratio) else f"distance {rec.ratio:.1f}x median"
        stale = f", unchanged {_bits(rec.stale_bits)}/{n}" if rec.stale_bits else ""
        return (
            f"{ratio}, clipped {_bits(rec.clipped_bits)}/{n} rounds, failed {_bits(rec.failed_bits)}/{n}"
            f"{stale} (score {rec.score:.2f})"
        )

    def threshold(self, own_norm: float | None) -> float | None:
        """The absolute BALANCE threshold for the current round (None when that test is off)."""
        if self.gamma is None or own_norm is None:
            return None
        return self.gamma * math.exp(-self.kappa * self.rounds / self.horizon) * own_norm

    def _changes(
        self, sketches: Mapping[str, np.ndarray] | None, own_sketch: np.ndarray | None
    ) -> tuple[dict[str, float], float]:
        """How far each neighbour's sketch moved since its last round, and the median move."""
        if sketches is None:
            return {}, 0.0
        moved: dict[str, float] = {}
        for nid, sk in sketches.items():
            rec = self._records.get(nid)
            if rec is not None and rec.sketch is not None and rec.sketch.shape == np.shape(sk):
                with np.errstate(over="ignore", invalid="ignore"):
                    c = float(np.linalg.norm(np.asarray(sk, dtype=np.float64) - rec.sketch))
                if math.isfinite(c):
                    moved[nid] = c
        votes = list(moved.values())
        # The node's own vote is its training step (own model against its last mixed output) when
        # known: its move between rounds also holds its mixing pull, which a neighbour that mixes
        # less (or not with us) does not share, and comparing the two made honest neighbours look
        # stale once mixing was uneven (a node left with one neighbour, after a freeze).
        base = self._out_sketch if self._out_sketch is not None else self._own_sketch
        if own_sketch is not None and base is not None and base.shape == own_sketch.shape:
            c = float(np.linalg.norm(np.asarray(own_sketch, dtype=np.float64) - base))
            if math.isfinite(c):
                votes.append(c)
        return moved, (upper_median(votes) if len(votes) >= 2 else 0.0)

    def update(
        self,
        distances: Mapping[str, float],
        radius: float | None = None,
        own_norm: float | None = None,
        sketches: Mapping[str, np.ndarray] | None = None,
        own_sketch: np.ndarray | None = None,
        own_step: float | None = None,
    ) -> dict[str, float]:
        """Take one round of evidence and return the updated score of every neighbour in `distances`.

        distances: neighbour id -> ||x_j - x_i|| (inf / NaN: the vector was unusable, a failure).
        radius: the round's clipping radius (None: ADAPTIVE_SLACK x the median distance).
        own_norm: ||x_i||, needed only for the absolute BALANCE test (gamma set).
        sketches / own_sketch: sketch_of(each neighbour's vector) and sketch_of(own) for the
        staleness test (mix passes them; without them that test is skipped).
        own_step: own_step(own), caps the reference distance (see reference).
        """
        self.rounds += 1
        dist = {nid: (float(d) if math.isfinite(d) else math.inf) for nid, d in distances.items()}
        m = self.reference(list(dist.values()), own_step)
        tau = ADAPTIVE_SLACK * m if radius is None else float(radius)
        limit = self.threshold(own_norm)
        moved, typical_move = self._changes(sketches, own_sketch)
        judge_clipping = sum(math.isfinite(d) for d in dist.values()) >= self.min_neighbours
        full = (1 << self.window) - 1
        out: dict[str, float] = {}
        for nid, d in dist.items():
            rec = self._records.pop(nid, None) or _Record(self.initial)
            self._records[nid] = rec  # most recently seen last (eviction order)
            rec.last = self.rounds
            if sketches is not None and nid in sketches and math.isfinite(d):
                rec.sketch = np.asarray(sketches[nid], dtype=np.float32).copy()
            stale = nid in moved and (moved[nid] == 0.0 or moved[nid] <= self.stale * typical_move)
            out[nid] = rec.score
            if math.isfinite(d) and m <= 0 and not stale:
                continue  # no scale to judge the distances by this round
            ratio = (d / m if m > 0 else 0.0) if math.isfinite(d) else math.inf
            failed = ratio > self.accept or (limit is not None and d > limit) or stale
            clipped = judge_clipping and d > tau
            rec.seen += 1
            rec.ratio = ratio
            rec.clipped_bits = ((rec.clipped_bits << 1) | int(clipped)) & full
            rec.failed_bits = ((rec.failed_bits << 1) | int(failed)) & full
            rec.stale_bits = ((rec.stale_bits << 1) | int(stale)) & full
            if failed:
                rec.failures += 1
                rec.score *= self.penalty
            elif rec.seen >= self.window and _bits(rec.clipped_bits) >= self.persistent * self.window:
                rec.score = min(rec.score, self.persistent_cap)
            elif not clipped:
                rec.score = min(1.0, rec.score + self.recovery)
            out[nid] = rec.score
        if own_sketch is not None:
            self._own_sketch = np.asarray(own_sketch, dtype=np.float32).copy()
        while len(self._records) > self.max_tracked:
            self._records.pop(next(iter(self._records)))
        return out
