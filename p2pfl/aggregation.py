"""Gossip averaging on flat float32 vectors: plain, clipped (ClippedGossip), sample-weighted, push-sum.

One gossip step at node i with the neighbour models x_j that arrived this round:

  mean:      x_i' = x_i + sum_j w_ij (x_j - x_i)                 = (1 - sum_j w_ij) x_i + sum_j w_ij x_j
  clipped:   x_i' = x_i + sum_j w_ij clip(x_j - x_i, tau),  clip(z, tau) = z * min(1, tau / ||z||)
  weighted:  x_i' = x_i + sum_j w_ij min(1, s_j / s_i) (x_j - x_i)
  push-sum:  m_i' = a_i m_i + sum_j w_ij m_j,   x_i' = (a_i m_i x_i + sum_j w_ij m_j x_j) / m_i'

with Metropolis-Hastings weights w_ij = 1/(1+max(deg_i, deg_j)) (degrees travel in update headers)
and a_i = 1 - sum_j w_ij. A neighbour that did not arrive contributes nothing and its weight stays on
x_i. Clipping is centred on the node's own model (He, Karimireddy & Jaggi 2022, "Byzantine-robust
decentralized learning via ClippedGossip"): one neighbour can move x_i by at most w_ij * tau per round
however far away it is, while neighbours within tau are averaged exactly as plain gossip would.

Weighting by data size (s_i = the node's sample count, carried in every update header):
- "weighted" is the Metropolis-Hastings chain whose stationary distribution is s: the weights satisfy
  s_i p_ij = s_j p_ji, so sum_i s_i x_i is conserved and plain averaging converges to the
  sample-weighted average sum_i s_i x_i / sum_i s_i. It is stateless (needs only the s_j and degrees
  already in the headers), it keeps weighting every round's local training by s_i, and a neighbour
  cannot pull harder than plain MH whatever sample count it claims (min(1, .) caps it). The price:
  a node with much more data than its neighbours moves slowly (s_i p_ij <= s_j w_ij), so the
  spectral gap shrinks as sizes get more skewed (topology.mixing_matrix(graph, samples) shows it).
- "push-sum" (weighted gossip, Kempe et al. 2003) starts each node's scalar mass m_i at s_i and mixes
  numerators m_i x_i and masses with the symmetric MH weights: x_i' is again a convex combination and
  its fixed point is the sample-weighted average. The node must keep m_i between rounds and send it
  with every update; it mixes as fast as plain MH, but masses tend to the mean sample count, so
  later training steps count equally.
  A neighbour lying about its mass can dominate the mix: use it only among trusted nodes.

Robust rules (issue 4; see also p2pfl.attacks for the attacks they are measured against):

  trimmed-mean: x_i' = per coordinate, the mean of {x_i} U {x_j} without the b smallest and the b largest
                values (b = trim, default min(floor((k-1)/2), ceil(TRIM_FRACTION * k)) for k votes)
  median:       x_i' = per coordinate, the median of {x_i} U {x_j}
  robust:       x_i' = x_i + sum_j r_j w_ij clip(x_j - x_i, tau)       (the default rule, DEFAULT_RULE)

Trimmed mean and median are the classic baselines: they ignore the MH weights (every vote counts the
same) and, on sparse graphs, they average less than gossip even without any attacker. "robust" is
self-centred clipping (as "clipped", adaptive radius) whose MH weights are first scaled by a
per-neighbour reputation r_j in [0, 1] (class Reputation, kept by the node across rounds): a neighbour
that keeps sending vectors far from the node's own model, relative to the node's other neighbours
(a BALANCE-style distance test, Fang et al. 2024, here relative to the median distance, which is
capped at a few of the node's own training steps so that a Byzantine majority around a node cannot
inflate it), that keeps sending the same vector (a replayed stale model), or that keeps being
clipped, loses weight within a few rounds; the weight it loses stays with the node itself; a
neighbour that behaves again regains weight slowly. The adaptive radius of "robust" uses the same
capped reference. Clipping bounds what one neighbour can do in any
single round (also before its reputation has dropped, and for attackers that stay within the test),
the reputation stops a persistent outlier from pulling at all.

`mix` runs one node's step (the real node); `mix_many` runs every node's step at once on an N x P
matrix with sparse weights (the simulator) and computes the same numbers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from p2pfl.errors import ConfigError

RULES = ("clipped", "mean", "weighted", "push-sum", "trimmed-mean", "median", "robust")
DEFAULT_RULE = "robust"  # clipping + reputation: what a node should run unless it trusts every peer
COORDINATE_RULES = ("trimmed-mean", "median")  # coordinate-wise rules over {own} U neighbours
ADAPTIVE_SLACK = 1.5  # tau = slack * median distance: see _adaptive_radius
TRIM_FRACTION = 0.2  # default trimmed-mean cut on each side (at least 1 value once there are 3 votes)
_NORM_CHUNK = 1 << 20
_MANY_CHUNK = 1 << 22  # values per chunk of edge differences in mix_many (16 MiB of float32)


def mh_weight(deg_i: int, deg_j: int) -> float:
    """Metropolis-Hastings weight of edge (i, j); never more than 1/(1+deg_i), whatever j claims."""
    return 1.0 / (1.0 + max(int(deg_i), int(deg_j), 0))


def sample_accept(own_samples: float, their_samples: float) -> float:
    """min(1, s_j / s_i): how much of the MH weight a neighbour gets under rule "weighted".

    A node without data (s_i <= 0) takes its neighbours fully; a neighbour without data pulls not at all.
    """
    s_i, s_j = max(float(own_samples), 0.0), max(float(their_samples), 0.0)
    return 1.0 if s_i <= 0 else min(1.0, s_j / s_i)


@dataclass(frozen=True)
class Neighbour:
    """One neighbour's model this round, as received (vector is the flattened float32 model).

    degree and samples come from the update header; mass too, for rule "push-sum" (None: use samples,
    which is the right value in a neighbour's first round).
    """

    node_id: str
    vector: np.ndarray
    degree: int
    samples: int
    mass: float | None = None


@dataclass(frozen=True)
class MixResult:
    """The mixed vector plus what the metrics and reputation need.

    weights are the neighbours' weights in the step: the MH weights w_ij for "mean" and "clipped" (a
    clipped neighbour's actual pull is weights[j] * min(1, radius / distances[j])), w_ij min(1, s_j/s_i)
    for "weighted", w_ij m_j / m_i' for "push-sum". own_weight = 1 - sum(weights).
    radius is None except for "clipped" and "robust". mass is the node's new push-sum mass (None for
    other rules): keep it for the next round and send it in the next update.

    Rule "robust": weights are w_ij * reputation[j] (the reputation after this round's update), so a
    distrusted neighbour's lost weight shows up in own_weight; reputation maps every neighbour that
    arrived to its score in [0, 1], downweighted maps those with a score below 1 to a short reason
    ("distance 8.3x median, clipped 4/5 rounds"). Both are empty for the other rules.
    Rules "trimmed-mean" / "median": weights[j] is neighbour j's average coefficient over the
    coordinates (the share of the coordinates where its value was kept, divided by the number of
    values kept there), so own_weight + sum(weights) = 1; clipped[j] is True when that is less than
    half an equal share (1 / (2k) for k votes), i.e. its values were mostly trimmed away.
    """

    vector: np.ndarray
    own_weight: float
    weights: dict[str, float]
    distances: dict[str, float]
    clipped: dict[str, bool]
    radius: float | None
    mass: float | None = None
    reputation: dict[str, float] = field(default_factory=dict)
    downweighted: dict[str, str] = field(default_factory=dict)


def _norm(v: np.ndarray) -> float:
    """Euclidean norm of a float32 vector without float32 overflow for huge (hostile) values."""
    with np.errstate(over="ignore", invalid="ignore"):
        s = float(np.dot(v, v))
    if math.isfinite(s):
        return math.sqrt(s)
    total = 0.0
    for start in range(0, v.size, _NORM_CHUNK):
        c = v[start : start + _NORM_CHUNK].astype(np.float64)
        total += float(np.dot(c, c))
    return math.sqrt(total)


def _adaptive_radius(distances: Sequence[float]) -> float:
    """ADAPTIVE_SLACK x the median of {0 (the node itself)} U {neighbour distances} (upper median).

    Counting the node itself as one vote at distance 0 keeps the median an honest distance as long
    as fewer than half of the votes are outliers, also on a ring (votes 0, d1, d2 -> the nearer
    neighbour). The slack lets honest neighbours somewhat farther than the median through
    unclipped, so without outliers the step is usually exactly plain gossip; a far outlier's pull
    is bounded by w_ij * slack * (a typical honest distance). This is the simple practical stand-in
    for the paper's adaptive tau (clip the farthest delta-fraction of the weight), which needs a
    known bound delta on the outliers' weight.
    """
    votes = sorted([0.0, *distances])
    return ADAPTIVE_SLACK * votes[len(votes) // 2]


def _median_reference(distances: Sequence[float]) -> float:
    """Upper median of {0 (the node itself)} U {the finite neighbour distances}: the radius's base."""
    votes = sorted([0.0, *(d for d in distances if math.isfinite(d))])
    return votes[len(votes) // 2]


# --------------------------------------------------------------------------------------------------
# per-neighbour reputation (rule "robust")

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
        m = _median_reference(distances)
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
        if (
            own_sketch is not None
            and self._own_sketch is not None
            and self._own_sketch.shape == own_sketch.shape
        ):
            c = float(np.linalg.norm(np.asarray(own_sketch, dtype=np.float64) - self._own_sketch))
            if math.isfinite(c):
                votes.append(c)
        votes.sort()
        return moved, (votes[len(votes) // 2] if len(votes) >= 2 else 0.0)

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


# --------------------------------------------------------------------------------------------------
# coordinate-wise rules (trimmed mean, median)


def trim_count(votes: int, trim: int | None = None) -> int:
    """Values cut from each end per coordinate for rule "trimmed-mean" with `votes` values.

    Default min(floor((k-1)/2), ceil(TRIM_FRACTION k)): 1 for 3..5 votes (degree 2..4), 2 for 6..10;
    an explicit trim is capped at floor((k-1)/2) so at least one value is kept.
    """
    cap = max(0, (votes - 1) // 2)
    if trim is None:
        return min(cap, math.ceil(TRIM_FRACTION * votes - 1e-9))
    return min(cap, max(0, int(trim)))


def _kept_positions(rule: str, votes: int, trim: int | None) -> tuple[int, int]:
    """[lo, hi) of the sorted values averaged per coordinate: the middle one or two for the median."""
    if rule == "median":
        lo = (votes - 1) // 2
        return lo, votes // 2 + 1
    b = trim_count(votes, trim)
    return b, votes - b


def _coordinate_step(stack: np.ndarray, lo: int, hi: int, counts: np.ndarray) -> np.ndarray:
    """Mean of the sorted values [lo, hi) along axis -2 of stack (..., k, c); adds to counts (..., k)
    how many coordinates each vote had kept. float64 sums of sorted values: same result per node."""
    order = np.argsort(stack, axis=-2, kind="stable")
    ordered = np.take_along_axis(stack, order, axis=-2)
    k = stack.shape[-2]
    kept = order[..., lo:hi, :]
    for v in range(k):
        counts[..., v] += (kept == v).sum(axis=(-2, -1))
    return ordered[..., lo:hi, :].astype(np.float64).mean(axis=-2).astype(np.float32)


def _coordinate_mix(
    x: np.ndarray, vectors: Sequence[np.ndarray], rule: str, trim: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Rule trimmed-mean / median at one node: (new vector, coefficient of each vote, own first)."""
    k = 1 + len(vectors)
    lo, hi = _kept_positions(rule, k, trim)
    counts = np.zeros(k, dtype=np.float64)
    out = np.empty_like(x)
    step = max(1, _NORM_CHUNK // k)
    for a in range(0, x.size, step):
        stack = np.stack([x[a : a + step], *(np.asarray(v[a : a + step], dtype=np.float32) for v in vectors)])
        out[a : a + step] = _coordinate_step(stack, lo, hi, counts)
    coef = counts / (max(x.size, 1) * (hi - lo))
    if x.size == 0:
        coef[:] = 1.0 / k
    return out, coef


def _check_rule(rule: str, radius: float | None) -> None:
    if rule not in RULES:
        raise ConfigError(f"unknown aggregation rule {rule!r}; known: {', '.join(RULES)}")
    if radius is not None and not (radius >= 0):  # also refuses NaN
        raise ConfigError(f"clipping radius must be >= 0, got {radius!r}")


def _valid_mass(m: float | None) -> bool:
    return m is not None and math.isfinite(m) and m >= 0


def mix(
    own: np.ndarray,
    own_degree: int,
    neighbours: Sequence[Neighbour],
    rule: str = "clipped",
    radius: float | None = None,
    *,
    own_samples: float | None = None,
    own_mass: float | None = None,
    reputation: Reputation | None = None,
    trim: int | None = None,
) -> MixResult:
    """One gossip step of `own` with the neighbours that arrived (see the module docstring).

    own_degree is this node's degree in the current topology (raised to len(neighbours) if smaller,
    so the own weight never goes negative). radius None with rule "clipped" or "robust" means
    adaptive (_adaptive_radius). Rule "weighted" needs own_samples; "push-sum" needs own_mass (the
    mass kept from the previous round; defaults to own_samples in the first round). Rule "robust"
    needs `reputation`, this node's Reputation kept across rounds: mix updates it with this round's
    distances and scales each neighbour's MH weight by its score before clipping (other rules
    ignore it). trim: values cut from each end per coordinate for "trimmed-mean" (see trim_count).
    A neighbour with non-finite values, or whose difference from own overflows float32, is ignored
    (weight 0 so it stays home, distance inf, clipped True; for "robust" it also counts as a failed
    round); so is a push-sum neighbour with a negative or non-finite mass. Works in float32 with two
    P-sized buffers whatever the number of neighbours (the coordinate-wise rules sort chunks of the
    k = 1 + neighbours votes: about k x 4 MiB).
    """
    _check_rule(rule, radius)
    x = np.asarray(own, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"own vector must be flat, got shape {x.shape}")
    ids = [nb.node_id for nb in neighbours]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate neighbour ids: {ids}")
    for nb in neighbours:
        if np.shape(nb.vector) != x.shape:
            raise ValueError(f"neighbour {nb.node_id}: shape {np.shape(nb.vector)} != own {x.shape}")
    if rule == "weighted" and own_samples is None:
        raise ValueError('rule "weighted" needs own_samples (this node\'s sample count)')
    if rule == "robust" and not isinstance(reputation, Reputation):
        raise ValueError('rule "robust" needs reputation= (this node\'s Reputation, kept across rounds)')
    if rule == "push-sum":
        own_mass = own_samples if own_mass is None else own_mass
        if own_mass is None or not _valid_mass(float(own_mass)):
            raise ValueError(f'rule "push-sum" needs own_mass >= 0 (or own_samples), got {own_mass!r}')
    deg_i = max(int(own_degree), len(neighbours))

    weights = {nb.node_id: mh_weight(deg_i, nb.degree) for nb in neighbours}
    tmp = np.empty_like(x)
    distances: dict[str, float] = {}
    usable: list[Neighbour] = []
    for nb in neighbours:
        with np.errstate(over="ignore", invalid="ignore"):
            np.subtract(np.asarray(nb.vector, dtype=np.float32), x, out=tmp)
        d = _norm(tmp)
        bad_mass = rule == "push-sum" and not _valid_mass(_mass_of(nb))
        if not math.isfinite(d) or bad_mass:  # NaN / inf (or a float32-overflowing difference)
            weights[nb.node_id] = 0.0
            distances[nb.node_id] = math.inf if not math.isfinite(d) else d
            continue
        distances[nb.node_id] = d
        usable.append(nb)
    clipped = {nid: not math.isfinite(d) or weights[nid] == 0.0 for nid, d in distances.items()}

    if rule in COORDINATE_RULES:
        if not np.isfinite(x).all():  # a broken own model: nothing sensible to sort; leave it (as mix_many)
            return MixResult(x.copy(), 1.0, {nid: 0.0 for nid in weights}, distances, clipped, None)
        out, coef = _coordinate_mix(x, [nb.vector for nb in usable], rule, trim)
        k = 1 + len(usable)
        for nb, c in zip(usable, coef[1:], strict=True):
            weights[nb.node_id] = float(c)
            clipped[nb.node_id] = bool(c < 0.5 / k)
        return MixResult(out, float(coef[0]), weights, distances, clipped, None)

    tau: float | None = None
    step: float | None = None
    if rule == "robust":
        assert reputation is not None
        step = reputation.own_step(x)
        tau = (
            float(radius)
            if radius is not None
            else reputation.radius([distances[nb.node_id] for nb in usable], step)
        )
    elif rule == "clipped":
        tau = (
            float(radius)
            if radius is not None
            else _adaptive_radius([distances[nb.node_id] for nb in usable])
        )
    new_mass: float | None = None
    scores: dict[str, float] = {}
    downweighted: dict[str, str] = {}
    if rule == "robust":
        assert reputation is not None
        sketches = (
            {nb.node_id: reputation.sketch_of(nb.vector) for nb in usable} if reputation.sketch else None
        )
        scores = reputation.update(
            distances,
            tau,
            _norm(x) if reputation.needs_norm else None,
            sketches,  # type: ignore[arg-type]
            reputation.sketch_of(x),
            step,
        )
        for nid, s in scores.items():
            weights[nid] *= s
            if s < 1.0:
                downweighted[nid] = reputation.reason(nid)
    elif rule == "weighted":
        for nb in usable:
            weights[nb.node_id] *= sample_accept(float(own_samples), nb.samples)  # type: ignore[arg-type]
    elif rule == "push-sum":
        keep = 1.0 - sum(weights[nb.node_id] for nb in usable)  # missing neighbours' weight stays home
        incoming = sum(weights[nb.node_id] * _mass_of(nb) for nb in usable)
        new_mass = keep * float(own_mass) + incoming  # type: ignore[arg-type]
        for nb in usable:
            weights[nb.node_id] = weights[nb.node_id] * _mass_of(nb) / new_mass if new_mass > 0 else 0.0

    out = x.copy()
    for nb in usable:
        d = distances[nb.node_id]
        scale = 1.0
        if tau is not None and d > tau:
            scale = tau / d
            clipped[nb.node_id] = True
        coef = weights[nb.node_id] * scale
        if coef == 0.0:
            continue
        np.subtract(np.asarray(nb.vector, dtype=np.float32), x, out=tmp)
        tmp *= np.float32(coef)
        out += tmp
    own_weight = 1.0 - sum(weights.values())
    if reputation is not None and rule == "robust":
        reputation.remember_output(out)
    return MixResult(out, own_weight, weights, distances, clipped, tau, new_mass, scores, downweighted)


def _mass_of(nb: Neighbour) -> float:
    return float(nb.samples if nb.mass is None else nb.mass)


# --------------------------------------------------------------------------------------------------
# every node at once (the simulator)


@dataclass(frozen=True)
class ManyResult:
    """mix_many's output: row i is what mix() returns at node i.

    matrix is the sparse N x N step actually applied (vectors = matrix @ x, or with `sent`:
    diag(matrix) x + offdiag(matrix) @ sent), useful for spectral analysis; for the coordinate-wise
    rules it holds each vote's average coefficient (as MixResult.weights) and the step itself is not
    linear. radius (clipped, robust) and mass (push-sum) are None for the other rules. For rule
    "robust", reputation[i] and downweighted[i] are node i's MixResult.reputation / .downweighted
    (keyed by ids); None for the other rules.
    """

    vectors: np.ndarray
    own_weight: np.ndarray
    radius: np.ndarray | None
    mass: np.ndarray | None
    matrix: sp.csr_matrix
    reputation: list[dict[str, float]] | None = None
    downweighted: list[dict[str, str]] | None = None


def edge_distances(
    x: np.ndarray, rows: np.ndarray, cols: np.ndarray, sent: np.ndarray | None = None
) -> np.ndarray:
    """||sent[cols[k]] - x[rows[k]]|| for every edge k (sent defaults to x; float64; inf where
    non-finite), in chunks."""
    src = x if sent is None else sent
    out = np.empty(len(rows), dtype=np.float64)
    step = max(1, _MANY_CHUNK // max(1, x.shape[1]))
    with np.errstate(over="ignore", invalid="ignore"):
        for a in range(0, len(rows), step):
            diff = src[cols[a : a + step]] - x[rows[a : a + step]]
            sq = np.einsum("ij,ij->i", diff, diff, dtype=np.float64)
            out[a : a + step] = np.sqrt(sq)
    out[~np.isfinite(out)] = np.inf
    return out


def _adaptive_radii(n: int, rows: np.ndarray, d: np.ndarray) -> np.ndarray:
    """_adaptive_radius for every node: upper median of {0} U {its finite edge distances}."""
    finite = np.isfinite(d)
    r, dist = rows[finite], d[finite]
    order = np.lexsort((dist, r))
    r, dist = r[order], dist[order]
    counts = np.bincount(r, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    k = (counts + 1) // 2  # index in the sorted votes [0, d_1 <= ... <= d_c]; 0 is the node itself
    med = np.zeros(n)
    has = k > 0
    med[has] = dist[starts[has] + k[has] - 1]
    return ADAPTIVE_SLACK * med


def _coordinate_many(
    x: np.ndarray,
    src: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    usable: np.ndarray,
    rule: str,
    trim: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Trimmed mean / median at every node (nodes grouped by their number of votes, sorted together).
    Returns (vectors, coefficient of every edge); the own coefficient is 1 - the node's edge sum."""
    n, p = x.shape
    vectors = x.copy()
    edge_coef = np.zeros(len(rows))
    e_ok = np.flatnonzero(usable)
    order = e_ok[np.argsort(rows[e_ok], kind="stable")]  # usable edges grouped by receiver, edge order kept
    got = np.bincount(rows[order], minlength=n)
    starts = np.concatenate([[0], np.cumsum(got)])
    own_ok = np.isfinite(x).all(axis=1)
    for k_nb in np.unique(got):
        nodes = np.flatnonzero((got == k_nb) & own_ok)
        if not len(nodes):
            continue
        k = int(k_nb) + 1
        lo, hi = _kept_positions(rule, k, trim)
        edges = (
            np.stack([order[starts[i] : starts[i + 1]] for i in nodes])
            if k_nb
            else np.zeros((len(nodes), 0), dtype=np.int64)
        )
        counts = np.zeros((len(nodes), k))
        step = max(1, _MANY_CHUNK // max(1, k * len(nodes)))
        for a in range(0, p, step):
            stack = np.concatenate([x[nodes, None, a : a + step], src[cols[edges], a : a + step]], axis=1)
            vectors[nodes, a : a + step] = _coordinate_step(stack, lo, hi, counts)
        coef = counts / (max(p, 1) * (hi - lo)) if p else np.full((len(nodes), k), 1.0 / k)
        if k_nb:
            edge_coef[edges.ravel()] = coef[:, 1:].ravel()
    return vectors, edge_coef


def mix_many(
    x: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    degrees: np.ndarray,
    rule: str = "clipped",
    radius: float | None = None,
    *,
    samples: np.ndarray | None = None,
    mass: np.ndarray | None = None,
    sent: np.ndarray | None = None,
    reputations: Sequence[Reputation] | None = None,
    ids: Sequence[str] | None = None,
    trim: int | None = None,
) -> ManyResult:
    """One gossip step at every node: row i of the result equals mix() at node i.

    x is N x P float32 (one model per row). Edge k means node rows[k] received cols[k]'s update this
    round (give both directions of an undirected edge; leave out what did not arrive). degrees are
    the degrees the nodes announce in their headers; samples (N,) are needed for "weighted", mass
    (N,) for "push-sum" (default: samples). sent (N x P, default x) is what each node sent this
    round, when that differs from its own model (an attacker's crafted vector): neighbours are
    taken from sent, each node's own model from x. Rule "robust" needs reputations, node i's
    Reputation at index i (updated in place, in node order), keyed by ids (default str(j)).
    The linear rules are assembled as one sparse N x N matrix; "robust" updates the reputations
    node by node (dicts of a few entries); the coordinate-wise rules sort all nodes with the same
    number of votes together. Outside "clipped" and "robust" a neighbour is skipped when its row is
    non-finite (mix() also skips one whose difference from own overflows float32, which only hostile
    values can do).
    """
    _check_rule(rule, radius)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be N x P, got shape {x.shape}")
    src = x if sent is None else np.asarray(sent, dtype=np.float32)
    if src.shape != x.shape:
        raise ValueError(f"sent must have the shape of x {x.shape}, got {src.shape}")
    n = x.shape[0]
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    deg = np.asarray(degrees, dtype=np.int64)
    if rows.shape != cols.shape or deg.shape != (n,):
        raise ValueError("rows/cols must have the same length and degrees one entry per node")
    if rule == "robust" and (reputations is None or len(reputations) != n):
        raise ValueError('rule "robust" needs reputations, one Reputation per node')
    names = [str(j) for j in range(n)] if ids is None else [str(v) for v in ids]
    if len(names) != n:
        raise ValueError(f"ids: {len(names)} entries for {n} nodes")
    received = np.bincount(rows, minlength=n)
    deg_i = np.maximum(deg, received)
    w = 1.0 / (1.0 + np.maximum(deg_i[rows], np.maximum(deg[cols], 0)))
    by_distance = rule in ("clipped", "robust")
    own_finite = np.isfinite(x).all(axis=1)
    row_finite = None if by_distance else own_finite
    src_finite = own_finite if src is x else np.isfinite(src).all(axis=1)
    d = edge_distances(x, rows, cols, src) if by_distance or rule in COORDINATE_RULES else None
    if by_distance:
        assert d is not None
        usable = np.isfinite(d)
    else:
        usable = src_finite[cols] & own_finite[rows]

    if rule in COORDINATE_RULES:
        vectors, coef = _coordinate_many(x, src, rows, cols, usable, rule, trim)
        own_weight = 1.0 - np.bincount(rows, weights=coef, minlength=n)
        own_weight[~own_finite] = 1.0
        off = sp.csr_matrix((coef, (rows, cols)), shape=(n, n))
        off.eliminate_zeros()
        matrix = (off + sp.diags(own_weight)).tocsr()
        return ManyResult(vectors, own_weight, None, None, matrix)

    tau = None
    new_mass = None
    reps: list[dict[str, float]] | None = None
    downs: list[dict[str, str]] | None = None
    coef = np.where(usable, w, 0.0)
    shown = coef.copy()  # the weights mix() reports (clipping scale not included)
    if by_distance:
        assert d is not None
        tau = np.full(n, float(radius)) if radius is not None else _adaptive_radii(n, rows, d)
        if rule == "robust":
            assert reputations is not None
            score = np.ones(len(rows))
            reps, downs = [{} for _ in range(n)], [{} for _ in range(n)]
            order = np.argsort(rows, kind="stable")
            bounds = np.searchsorted(rows[order], np.arange(n + 1))
            sizes = {r.sketch for r in reputations if r.sketch}
            idx = {k: sketch_index(x.shape[1], k) for k in sizes}
            sk_src = {k: src[:, i] for k, i in idx.items()}
            sk_own = {k: x[:, i] for k, i in idx.items()}
            for i in range(n):
                edges = order[bounds[i] : bounds[i + 1]]
                rep = reputations[i]
                dist = {
                    names[j]: float(d[e]) for e, j in zip(edges.tolist(), cols[edges].tolist(), strict=True)
                }
                own_norm = _norm(x[i]) if rep.needs_norm else None
                step = rep.own_step(x[i])
                if radius is None:
                    tau[i] = rep.radius(list(dist.values()), step)
                sk = own_sk = None
                if rep.sketch:
                    ok_edges = [
                        (e, j) for e, j in zip(edges.tolist(), cols[edges].tolist(), strict=True) if usable[e]
                    ]
                    sk = {names[j]: sk_src[rep.sketch][j] for _, j in ok_edges}
                    own_sk = sk_own[rep.sketch][i]
                s = rep.update(dist, float(tau[i]), own_norm, sk, own_sk, step)
                score[edges] = [s[names[j]] for j in cols[edges].tolist()]
                reps[i] = s
                downs[i] = {nid: rep.reason(nid) for nid, v in s.items() if v < 1.0}
            coef = coef * score
            shown = coef.copy()
        t = tau[rows]
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(d > t, t / d, 1.0)  # type: ignore[operator]
        coef = coef * np.where(usable, scale, 0.0)
    elif rule == "weighted":
        if samples is None:
            raise ValueError('rule "weighted" needs samples')
        s = np.maximum(np.asarray(samples, dtype=np.float64), 0.0)
        si, sj = s[rows], s[cols]
        with np.errstate(divide="ignore", invalid="ignore"):
            acc = np.where(si <= 0, 1.0, np.minimum(1.0, sj / si))
        coef = shown = coef * acc
    elif rule == "push-sum":
        m = np.asarray(samples if mass is None else mass, dtype=np.float64)
        if m is None or m.shape != (n,):
            raise ValueError('rule "push-sum" needs mass (or samples), one per node')
        ok = np.isfinite(m) & (m >= 0)
        coef = np.where(ok[cols], coef, 0.0)
        keep = 1.0 - np.bincount(rows, weights=coef, minlength=n)
        new_mass = keep * m + np.bincount(rows, weights=coef * np.where(ok, m, 0.0)[cols], minlength=n)
        with np.errstate(divide="ignore", invalid="ignore"):
            coef = np.where(new_mass[rows] > 0, coef * np.where(ok, m, 0.0)[cols] / new_mass[rows], 0.0)
        shown = coef

    own_weight = 1.0 - np.bincount(rows, weights=shown, minlength=n)
    off = sp.csr_matrix((coef, (rows, cols)), shape=(n, n))
    off.eliminate_zeros()  # an explicit 0 times a non-finite neighbour row would still give NaN
    diag = 1.0 - np.asarray(off.sum(axis=1)).ravel()
    matrix = (off + sp.diags(diag)).tocsr()
    if src is x:
        vectors = np.asarray(matrix.astype(np.float32) @ x, dtype=np.float32)
    else:
        vectors = np.asarray(off.astype(np.float32) @ src, dtype=np.float32)
        vectors += diag.astype(np.float32)[:, None] * x
    if row_finite is not None and not row_finite.all():
        vectors[~row_finite] = x[~row_finite]  # mix() at a node whose own model is broken: untouched rows
    if rule == "robust":
        assert reputations is not None
        for i, rep in enumerate(reputations):
            rep.remember_output(vectors[i])
    return ManyResult(vectors, own_weight, tau, new_mass, matrix, reps, downs)
