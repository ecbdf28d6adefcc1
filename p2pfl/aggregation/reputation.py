"""Per-neighbour reputation of rule "robust": trust built from evidence across rounds (class Reputation).

A neighbour that keeps sending vectors far from the node's own model, relative to the node's
reference distance (a BALANCE-style distance test, Fang et al. 2024), or that keeps sending the same
vector (a replayed stale model), loses weight within a few rounds; one that behaves again regains
it slowly.

Honest neighbours must not lose weight by chance: in long runs, under label skew, on a ring where
each node has two neighbours. The earlier single-round scheme did (49% of honest edge-rounds in a
1,500-round run of 6 real nodes, 12-25% in label-skewed simulations; docs/robust_notes.md). What
keeps an honest neighbour's weight now, each against a measured cause:

- evidence must repeat: a failure is held back until the neighbour fails in 3 of 4 rounds (2 of 4
  for what no honest model does: a vector farther from the node's model than that model is from
  zero, or an identical one again), then every held-back round counts (an honest node's spiky
  local step keeps it 6-11x too far for one or two rounds);
- the reference does not collapse: it is at least the node's recent typical reference, and the cap
  that keeps a Byzantine majority from inflating it is 4 x the node's largest recent training
  step, not this round's (which shrinks by orders of magnitude near convergence);
- only flagrant evidence costs weight: a neighbour only moderately far (up to `flagrant` x the
  acceptance ratio) or barely changing is on record but keeps its weight (clipping bounds its
  pull); cutting it lets the two models drift apart, which makes it look farther still, a loop an
  honest pair never left. Attacks that matter are far beyond that, or fail the norm or replay
  test, and lose all their weight;
- with two neighbours the clipping radius no longer clips what the test accepts (clipping the
  farther honest neighbour every round pulled rings apart under skew), persistent clipping is no
  longer evidence by default, and a node far from all its neighbours at once blames none of them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from p2pfl.aggregation.weights import ADAPTIVE_SLACK, median_reference, upper_median
from p2pfl.errors import ConfigError

REPUTATION_ACCEPT = 3.0  # distance test: d_j <= accept * reference passes
REPUTATION_PENALTY = 0.5  # score multiplier per failed round (once the evidence is confirmed)
REPUTATION_RECOVERY = 0.05  # score added per clean round (passed and not clipped): 0 -> 1 in 20 rounds
REPUTATION_WINDOW = 8  # rounds of clipped / failed flags remembered per neighbour
REPUTATION_PERSISTENT = 0.75  # clipped in >= 3/4 of a full window counts as persistent clipping ...
REPUTATION_PERSISTENT_CAP = 1.0  # ... which caps the score at this value (1: off)
REPUTATION_MIN_NEIGHBOURS = 3  # clipping counts as evidence only with this many neighbours in the round
REPUTATION_SKETCH = 128  # coordinates kept per neighbour to see whether its vector changed (0: off)
REPUTATION_STALE = 0.1  # changed less than this fraction of the median change since last round: stale
REPUTATION_STEP_CAP = 4.0  # the reference is at most this many recent own training steps (0: off)
REPUTATION_CONFIRM = 3  # failed rounds (within the last CONFIRM_WINDOW) before any penalty
REPUTATION_CONFIRM_WINDOW = 4
REPUTATION_CONFIRM_FLAGRANT = 2  # ... after the norm test or an identical vector (no honest model does that)
REPUTATION_WARMUP = 8  # the node's first rounds: only flagrant failures count
REPUTATION_HISTORY = 32  # rounds of own references and training steps behind the floor and the cap
REPUTATION_FLAGRANT = 2.0  # ratio > flagrant x accept (or norm test, replay, unusable): no score floor
REPUTATION_SUSPECT_FLOOR = 1.0  # lowest score moderate failures can bring a neighbour to (1: no cut)
REPUTATION_NORM_FLAGRANT = 1.0  # d_j > this x ||own model||: a flagrant failure whatever the ratio (0: off)
REPUTATION_MAX_TRACKED = 1024  # neighbours remembered (least recently seen forgotten first)
_CAPPED_MARGIN = 2.0  # flagrant needs this x the usual ratio when the step cap set the reference
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
    ratio: float = 0.0  # last distance / reference distance (inf: unusable vector)
    last: int = 0  # Reputation.rounds when last seen
    held: int = 0  # failed rounds not yet charged (waiting for the evidence to repeat)
    sketch: np.ndarray | None = None  # the neighbour's last vector at sketch_index(P)


_RECORD_FIELDS = frozenset(f.name for f in fields(_Record)) - {"sketch"}


def _bits(mask: int) -> int:
    return bin(mask).count("1")


def _finite_positive(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v) and v > 0


class Reputation:
    """One node's per-neighbour trust, built from evidence across rounds (rule "robust").

    Every round the node calls `update` (mix does it for rule "robust") with the distance of each
    neighbour's vector from the node's own model. The reference distance R of the round:

    - m = upper median of {0} U {finite d_k} (the node itself votes at 0, so m is an honest distance
      while fewer than half the votes are outliers: on a ring, the nearer neighbour);
    - floor: R >= the upper median of the node's last `history` (capped) medians, so a neighbour
      that comes unusually close for a few rounds does not make the others look far;
    - cap: R <= step_cap x the largest of the node's last `history` training steps
      (||own - its last mixed model||, from sketches), so a node most of whose neighbours are
      Byzantine keeps an honest scale (see step_scale for why the largest).

    The evidence of one round, for neighbour j (ratio_j = d_j / R):

    - distance test (BALANCE-style): far iff ratio_j > accept. With gamma set, also the original
      BALANCE test (Fang et al. 2024): d_j <= gamma * exp(-kappa t / horizon) * ||x_i|| (t = this
      node's round count), which needs a horizon and a model scale, hence off by default;
    - flagrant: ratio_j > flagrant x accept (twice that when the cap set R), or d_j >
      norm_flagrant x ||x_i|| (its model is farther from ours than ours is from zero: a sign flip,
      a scaled or noise vector, whatever the phase of training), or the very same vector as last
      round (a replay), or unusable (non-finite);
    - staleness (with sketches, which mix passes): j's vector did not change at all since its last
      round, or by at most `stale` x the median change of {own} U {neighbours} (sampled on `sketch`
      fixed coordinates): a node that trains changes its model every round, one replaying an old
      model does not (but an honest one whose loss is ~0 barely does: only an identical vector is
      flagrant);
    - in the node's first `warmup` rounds only flagrant evidence counts (the first rounds' distances
      show the shards' differences before any mixing); and when every usable neighbour (two or
      more) is far at once, it is this node that moved (or all its neighbours are Byzantine, which
      no local test tells apart): the distances single no one out that round;
    - clipped_j: d_j > radius (the round's clipping radius), counted only with at least
      min_neighbours usable neighbours; it caps the score only when persistent_cap < 1 (off by
      default: under label skew honest far neighbours are clipped persistently too).

    The score s_j (starts at `initial`, 1 = full MH weight) then moves:

    - failed (far, or flagrant): held back until j has failed in `confirm` (after the norm test or
      an identical vector: `confirm_flagrant`) of its last `confirm_window` rounds of evidence,
      then every held-back failure counts: s_j *= penalty per failed round (a sign-flipped model
      is at 0.25 after its second round, one 10x too far at 0.125 after its third). A held-back
      failure older than the window is forgiven. An unusable vector counts at once;
    - a failure that is not flagrant never takes s_j below suspect_floor (1 by default: no cut), so
      an honest pair cannot drift apart because one of them stopped listening;
    - otherwise, with persistent_cap < 1 and clipped in >= persistent of the last `window` rounds
      -> s_j = min(s_j, persistent_cap); otherwise, not clipped -> s_j += recovery (slowly, 0.05 a
      round), capped at 1; clipped now and then -> unchanged.

    A neighbour that did not arrive gives no evidence. If R is 0 (half the votes equal the node's
    own model, no history) the distances give no evidence. The earlier single-round scheme was close
    to Reputation(confirm=1, history=0, warmup=0, flagrant=1, norm_flagrant=0, persistent_cap=0.5),
    except that its cap used this round's step alone and a barely changing vector was flagrant.

    Pure and deterministic; memory is bounded by max_tracked records of a few numbers and `sketch`
    floats each (the least recently seen neighbour is dropped first), plus 2 x history floats.
    `forget(node_id)` drops one neighbour (e.g. when it leaves the federation; if it comes back it
    starts again at `initial`).
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
        confirm: int = REPUTATION_CONFIRM,
        confirm_window: int = REPUTATION_CONFIRM_WINDOW,
        confirm_flagrant: int = REPUTATION_CONFIRM_FLAGRANT,
        history: int = REPUTATION_HISTORY,
        warmup: int = REPUTATION_WARMUP,
        flagrant: float = REPUTATION_FLAGRANT,
        suspect_floor: float = REPUTATION_SUSPECT_FLOOR,
        norm_flagrant: float = REPUTATION_NORM_FLAGRANT,
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
            (
                isinstance(confirm_window, int) and 1 <= confirm_window <= window,
                "confirm_window must be an integer in 1..window",
            ),
            (
                isinstance(confirm, int) and 1 <= confirm <= confirm_window,
                "confirm must be an integer in 1..confirm_window",
            ),
            (
                isinstance(confirm_flagrant, int) and 1 <= confirm_flagrant <= confirm_window,
                "confirm_flagrant must be an integer in 1..confirm_window",
            ),
            (isinstance(history, int) and 0 <= history <= 4096, "history must be an integer in 0..4096"),
            (isinstance(warmup, int) and warmup >= 0, "warmup must be an integer >= 0"),
            (flagrant >= 1, "flagrant must be >= 1 (inf: no failure is flagrant)"),
            (0 <= suspect_floor <= 1, "suspect_floor must be in [0, 1]"),
            (norm_flagrant >= 0, "norm_flagrant must be >= 0 (0: off)"),
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
        self.confirm, self.confirm_window, self.history = confirm, confirm_window, history
        self.confirm_flagrant = min(confirm_flagrant, confirm)  # flagrant evidence never waits longer
        self.warmup = warmup
        self.flagrant, self.suspect_floor = float(flagrant), float(suspect_floor)
        self.norm_flagrant = float(norm_flagrant)
        self.gamma, self.kappa, self.horizon = gamma, float(kappa), int(horizon)
        self.max_tracked = max_tracked
        self.rounds = 0  # update() calls so far
        self._records: dict[str, _Record] = {}
        self._own_sketch: np.ndarray | None = None
        self._out_sketch: np.ndarray | None = None  # sketch of the node's last mixed model
        self._refs: list[float] = []  # the last `history` references (> 0), oldest first
        self._steps: list[float] = []  # the last `history` own training steps (> 0), oldest first

    @property
    def needs_norm(self) -> bool:
        """True when update() needs own_norm (the norm test or the absolute BALANCE test is on)."""
        return self.gamma is not None or self.norm_flagrant > 0

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

    def step_scale(self, own_step: float | None = None) -> float | None:
        """The node's recent training step scale: the largest of its last `history` steps and this
        one (None when none is known; with history 0, this round's step alone).

        The largest, not the median: a node whose shard is easy (or nearly learnt) takes steps a
        fraction of its noisier rounds' while its honest neighbours, training on other data, stay
        where they are; measured on 16 label-skewed nodes the median made such a node fail its
        honest neighbours in 1.5-2.5% of rounds, the maximum in 0.1% (docs/robust_notes.md), with
        the same attack results."""
        steps = list(self._steps)
        if own_step is not None and _finite_positive(own_step):
            steps.append(float(own_step))
        return max(steps) if steps else None

    def reference(self, distances: Sequence[float], own_step: float | None = None) -> float:
        """The distance scale of the round: the upper median of {0} U {finite distances}, at least
        the upper median of the node's recent references, at most step_cap x its typical training
        step (a scale the neighbours cannot inflate, for a node most of whose neighbours are
        Byzantine). Pure: the history moves on in update()."""
        m, cap = self._refs_or_median(distances), self._cap(own_step)
        return m if cap is None else min(m, cap)

    def _refs_or_median(self, distances: Sequence[float]) -> float:
        """The reference before the cap: the median, floored by the node's recent references."""
        m = median_reference(distances)
        return max(m, upper_median(self._refs)) if self._refs else m

    def _cap(self, own_step: float | None) -> float | None:
        scale = self.step_scale(own_step) if self.step_cap else None
        return None if scale is None else self.step_cap * scale

    def radius(self, distances: Sequence[float], own_step: float | None = None) -> float:
        """The adaptive clipping radius of rule "robust": ADAPTIVE_SLACK x the reference, or with
        fewer than min_neighbours usable neighbours, accept x the reference (what the distance
        test accepts is not clipped).

        Why: with two neighbours the reference is the nearer one's distance. Under label skew the
        farther honest neighbour is typically about twice as far, so ADAPTIVE_SLACK clipped it every
        round; its pull weakened, the nearer pair drifted together, the reference shrank with them
        and clipped the farther one harder: a loop that ended with honest neighbours on a ring 3-7x
        "too far" for good (measured in docs/robust_notes.md).
        """
        finite = [d for d in distances if math.isfinite(d)]
        slack = ADAPTIVE_SLACK if len(finite) >= self.min_neighbours else max(ADAPTIVE_SLACK, self.accept)
        return slack * self.reference(finite, own_step)

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
        """What a checkpoint keeps: the records and the node's history as plain values, and the
        sketches as arrays."""
        records = {
            nid: {k: v for k, v in asdict(r).items() if k != "sketch"} for nid, r in self._records.items()
        }
        arrays = {f"sketch/{nid}": r.sketch for nid, r in self._records.items() if r.sketch is not None}
        if self._out_sketch is not None:
            arrays["out_sketch"] = self._out_sketch
        values = {
            "rounds": self.rounds,
            "records": records,
            "refs": list(self._refs),
            "steps": list(self._steps),
        }
        return values, arrays

    def restore(self, values: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Load what `state` returned (a node resuming from its checkpoint). Tolerant of checkpoints
        written by earlier versions: missing fields take their defaults, unknown ones are ignored."""
        self.rounds = int(values.get("rounds", 0))
        self._records = {}
        for nid, raw in dict(values.get("records") or {}).items():
            known = {k: v for k, v in dict(raw).items() if k in _RECORD_FIELDS}
            known.setdefault("score", self.initial)
            self._records[str(nid)] = _Record(**known, sketch=arrays.get(f"sketch/{nid}"))
        keep = self.history

        def floats(key: str) -> list[float]:
            got = [float(v) for v in values.get(key) or () if _finite_positive(float(v))]
            return got[-keep:] if keep else []

        self._refs, self._steps = floats("refs"), floats("steps")
        self._out_sketch = arrays.get("out_sketch")

    def forget(self, node_id: str) -> None:
        """Drop what is known about one neighbour (no error if unknown)."""
        self._records.pop(node_id, None)

    def reason(self, node_id: str) -> str:
        """Short human-readable evidence: "distance 8.3x reference, clipped 4/5 rounds, failed 4/5"."""
        rec = self._records.get(node_id)
        if rec is None:
            return "unknown"
        n = min(rec.seen, self.window)
        ratio = "unusable vector" if not math.isfinite(rec.ratio) else f"distance {rec.ratio:.1f}x reference"
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

    def _clipped_persistently(self, rec: _Record) -> bool:
        return _bits(rec.clipped_bits) >= self.persistent * self.window

    def _remember(self, distances: Sequence[float], own_step: float | None) -> None:
        """Move the node's history on by one round: this round's median (capped, so neighbours
        cannot raise the floor above the cap; without the floor, or the floor would only ever
        rise) and its training step."""
        if not self.history:
            return
        m, cap = median_reference(distances), self._cap(own_step)
        m = m if cap is None else min(m, cap)
        if _finite_positive(m):
            self._refs = [*self._refs, m][-self.history :]
        if own_step is not None and _finite_positive(own_step):
            self._steps = [*self._steps, float(own_step)][-self.history :]

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
        radius: the round's clipping radius (None: ADAPTIVE_SLACK x the reference).
        own_norm: ||x_i||, for the norm test (norm_flagrant) and the absolute BALANCE test (gamma).
        sketches / own_sketch: sketch_of(each neighbour's vector) and sketch_of(own) for the
        staleness test (mix passes them; without them that test is skipped).
        own_step: own_step(own), for the cap on the reference (see reference).
        """
        self.rounds += 1
        dist = {nid: (float(d) if math.isfinite(d) else math.inf) for nid, d in distances.items()}
        finite = [d for d in dist.values() if math.isfinite(d)]
        m = self.reference(finite, own_step)
        # When the step cap set the reference (the neighbourhood is many of this node's steps away:
        # a Byzantine majority, or honest neighbours with other data around a node whose own steps
        # are small), "flagrant" needs twice the ratio: measured, the tighter bar excluded honest
        # far neighbours of low-step nodes (1% of edge-rounds over 1,000 label-skewed rounds).
        capped = self._refs_or_median(finite) > m
        flagrant_ratio = self.flagrant * self.accept * (_CAPPED_MARGIN if capped else 1.0)
        tau = self.radius(finite, own_step) if radius is None else float(radius)
        limit = self.threshold(own_norm)
        moved, typical_move = self._changes(sketches, own_sketch)
        judge_clipping = len(finite) >= self.min_neighbours
        # Every usable neighbour far beyond the reference at once: it is this node that moved (a
        # spiky local step, a restart), or all its neighbours are Byzantine (which no local test can
        # tell from this side); either way the distances single no one out this round.
        self_moved = len(finite) >= 2 and m > 0 and min(finite) > self.accept * m
        full = (1 << self.window) - 1
        recent_mask = (1 << self.confirm_window) - 1
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
            usable = math.isfinite(d)
            ratio = (d / m if m > 0 else 0.0) if usable else math.inf
            beyond_norm = (
                own_norm is not None and self.norm_flagrant > 0 and d > self.norm_flagrant * own_norm
            )
            far_ratio = ratio > self.accept and not self_moved
            # an identical vector is a replay; one that barely moved may be an honest node whose loss
            # is ~0 (near convergence, a one-class shard): moderate evidence only
            unchanged = stale and moved[nid] == 0.0
            certain = unchanged or beyond_norm  # no honest model does this, however spiky its step
            flagrant = not usable or unchanged or beyond_norm or (far_ratio and ratio > flagrant_ratio)
            far = far_ratio or (limit is not None and d > limit)
            failed = flagrant or ((far or stale) and self.rounds > self.warmup)
            clipped = judge_clipping and d > tau
            rec.seen += 1
            rec.ratio = ratio
            rec.clipped_bits = ((rec.clipped_bits << 1) | int(clipped)) & full
            rec.failed_bits = ((rec.failed_bits << 1) | int(failed)) & full
            rec.stale_bits = ((rec.stale_bits << 1) | int(stale)) & full
            recent = _bits(rec.failed_bits & recent_mask)
            if failed:
                rec.failures += 1
                if usable and recent < (self.confirm_flagrant if certain else self.confirm):
                    rec.held += 1  # not yet: one failure is not a pattern
                else:
                    factor = self.penalty ** (1 + rec.held)
                    rec.held = 0
                    low = 0.0 if flagrant else min(rec.score, self.suspect_floor)
                    rec.score = max(rec.score * factor, low)
            elif self.persistent_cap < 1 and rec.seen >= self.window and self._clipped_persistently(rec):
                rec.score = min(rec.score, self.persistent_cap)
            elif not clipped:
                rec.score = min(1.0, rec.score + self.recovery)
            rec.held = min(rec.held, recent)  # a held-back failure older than the window is forgiven
            out[nid] = rec.score
        self._remember(finite, own_step)
        if own_sketch is not None:
            self._own_sketch = np.asarray(own_sketch, dtype=np.float32).copy()
        while len(self._records) > self.max_tracked:
            self._records.pop(next(iter(self._records)))
        return out
