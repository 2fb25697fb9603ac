"""SLO pacing: which decoding requests ride in the next step, and how many prompt tokens may join.

Where every extra token in a step costs time (this 2-core CPU: 4.0 ms for one token, 5.4 ms for
two, 8.9 ms for eight), batching a request with a tight TPOT SLO beside others can push it past
its SLO although the others did not need a token yet. Uniform batching then misses the tight
requests and the loose ones alike. Pacing lets a request that is ahead of its SLO sit out a step
so that the step stays short enough for the ones that need it, and admits prompt tokens only as
far as the decoding requests' slack allows. On a flat profile (a GPU below its knee, the
paper's 70B profile below 128 tokens) including everyone is free, the fast path below keeps
every request in the step and pacing changes nothing.

Per decoding request `r` (the paper's TPOT: decoding time over tokens decoded after the first):

    slack_r  = decoded_r * slo_r - elapsed_r        seconds ahead (>= 0) or behind (< 0) its SLO
    cap_r    = slo_r + max(slack_r - reserve_r, 0)   slack_r >= 0: the longest step it may join
             = slo_r + slack_r / remaining_r         slack_r < 0: repay the deficit evenly
    reserve_r = margin * slo_r * remaining_r         slack kept against step-time noise
    after a step of `t` seconds, r is *on track* when
             in the step:   t <= cap_r               (it gains at least one token)
             out of it:     2 t <= cap_r             (its token can come with the next step)

The choice (exact for this one step): for every step size `k` = 1 .. n (the step's time is
`t_k = step(k)`), the requests that can be in (`t_k <= cap`) but not out (`2 t_k > cap`) go in
first, then the ones that are on track either way, then the rest; the on-track count of size
`k` is `min(k, #need) + #either`. Take the `k` with the most requests on track, ties to the
larger `k` (more tokens per step). Prompt tokens then fill the step up to the shortest `cap` of
the on-track requests in it and half the shortest `cap` of the on-track requests left out.

A prompt's last chunk yields its request's first token, and from then on its TPOT clock runs:
`gate_prompts` lets a waiting prompt be prefilled only when its request, joining the decoding
ones with no slack, would add one request on track (so two tight requests are served one after
the other rather than both too slowly).

Guards: a request that has sat out `max_skips` steps in a row is always in (no starvation; a
request that can no longer attain its SLO still finishes); requests without an SLO never
constrain a step and are in whenever they fit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# fraction of each remaining token's SLO kept as slack against step-time noise: slack is spent
# (a longer step, a prompt chunk, sitting out) only beyond it
NOISE_MARGIN = 0.1


def step_caps(slack_s, slo_s, remaining, margin: float = NOISE_MARGIN) -> np.ndarray:
    """f64[n]: the longest step (seconds) each request may join and stay on track."""
    slack = np.asarray(slack_s, np.float64)
    slo = np.asarray(slo_s, np.float64)
    rem = np.maximum(np.asarray(remaining, np.int64), 1)
    spare = np.maximum(slack - margin * slo * rem, 0.0)
    return slo + np.where(slack >= 0, spare, slack / rem)


@dataclasses.dataclass(frozen=True, slots=True)
class PacingChoice:
    """include: bool[n] requests in the step; max_tokens: tokens the step may carry in all
    (>= the included count; prompt chunks get the rest); on_track: requests predicted on track."""

    include: np.ndarray
    max_tokens: int
    on_track: int


def pace_step(
    slack_s: np.ndarray,
    slo_s: np.ndarray,
    remaining: np.ndarray,
    skipped: np.ndarray,
    step_s: np.ndarray,
    *,
    max_skips: int = 4,
    margin: float = NOISE_MARGIN,
) -> PacingChoice:
    """The pacing choice for `n` decoding requests (see the module docstring).

    slack_s, slo_s: f64[n] seconds; remaining: i64[n] tokens each may still produce (>= 1);
    skipped: i64[n] steps each has sat out in a row; step_s: f64[K + 1] step seconds by tokens
    carried (`step_s[k]` for k tokens; non-decreasing; K = the most tokens a step may carry, >= n).
    """
    slack = np.asarray(slack_s, np.float64)
    n = slack.shape[0]
    step = np.asarray(step_s, np.float64)
    if step.ndim != 1 or step.shape[0] < n + 1:
        raise ValueError(f"step_s has {step.shape} entries, needs >= n + 1 = {n + 1}")
    if np.any(np.diff(step[1:]) < 0):
        raise ValueError("step_s must be non-decreasing")
    return pace_step_trusted(
        slack, np.asarray(slo_s, np.float64), np.asarray(remaining, np.int64),
        np.asarray(skipped, np.int64), step, max_skips=max_skips, margin=margin,
    )  # fmt: skip


def pace_step_trusted(
    slack: np.ndarray,
    slo: np.ndarray,
    remaining: np.ndarray,
    skipped: np.ndarray,
    step: np.ndarray,
    *,
    max_skips: int = 4,
    margin: float = NOISE_MARGIN,
) -> PacingChoice:
    """`pace_step` without its input checks, for the scheduler's hot path (one to four calls
    an iteration under load): f64 slack and SLOs, i64 remaining and skipped, and a step table
    valid by construction (`StepTimes.seconds()`: non-decreasing, > n entries)."""
    n = slack.shape[0]
    budget = step.shape[0] - 1
    if n == 0:
        return PacingChoice(np.zeros(0, bool), budget, 0)
    cap = step_caps(slack, slo, remaining, margin)
    # fast path: everyone in, and the step stays short enough for all who can be on track
    track = cap >= step[n]
    if np.all(track | (cap < step[1])):
        limit = cap[track].min(initial=np.inf)
        return PacingChoice(np.ones(n, bool), _fill_to(step, n, limit), int(track.sum()))
    forced = skipped >= max_skips
    t = step[1 : n + 1][:, None]  # [n, 1] step time by size k = 1..n
    can_in = cap[None, :] >= t  # [k, n]
    can_out = cap[None, :] >= 2 * t
    need = can_in & ~can_out
    either = can_in & can_out
    n_force = int(forced.sum())
    sizes = np.arange(1, n + 1)
    n_need = need.sum(1)
    # forced requests take places first; those among `need` count, the rest do not
    forced_need = (need & forced[None, :]).sum(1)
    free = np.maximum(sizes - n_force, 0)
    score = forced_need + np.minimum(free, n_need - forced_need) + either.sum(1)
    score = np.where(sizes >= n_force, score, -1)  # the forced ones must fit
    k = int(np.lexsort((-sizes, -score))[0]) + 1
    row = k - 1
    # order: forced, then needing, then on track either way (tightest cap first), then the rest
    group = np.where(forced, 0, np.where(need[row], 1, np.where(either[row], 2, 3)))
    order = np.lexsort((cap, group))
    include = np.zeros(n, bool)
    include[order[:k]] = True
    in_track = include & can_in[row]
    out_track = ~include & can_out[row]
    limit = min(cap[in_track].min(initial=np.inf), cap[out_track].min(initial=np.inf) / 2)
    on_track = int(in_track.sum() + out_track.sum())
    return PacingChoice(include, _fill_to(step, k, limit), on_track)


def gate_prompts(
    slack_s: np.ndarray,
    slo_s: np.ndarray,
    remaining: np.ndarray,
    step_s: np.ndarray,
    new_slo_s: np.ndarray,
    new_remaining: np.ndarray,
    margin: float = NOISE_MARGIN,
    base_on_track: int | None = None,
) -> np.ndarray:
    """bool[m]: which of `m` waiting prompts (in order) may be prefilled now.

    Prompt j is let in when pacing the decoding requests plus the ones let in before it plus j
    (slack 0, SLO `new_slo_s[j]`) keeps one more request on track than without j (as many, for
    a request whose SLO is below a one-token step: it cannot attain it anyway). A step can
    hold at most `len(step_s) - 1` decoding requests; prompts past that wait.
    base_on_track: `pace_step(slack_s, slo_s, remaining, no skips, step_s).on_track` when the
    caller has it already (computed here otherwise).
    """
    step = np.asarray(step_s, np.float64)
    if step.ndim != 1 or step.shape[0] < 2:
        raise ValueError(f"step_s has {step.shape} entries, needs >= 2")
    if np.any(np.diff(step[1:]) < 0):
        raise ValueError("step_s must be non-decreasing")
    return gate_prompts_trusted(
        np.asarray(slack_s, np.float64), np.asarray(slo_s, np.float64),
        np.asarray(remaining, np.int64), step, np.asarray(new_slo_s, np.float64),
        np.asarray(new_remaining, np.int64), margin=margin, base_on_track=base_on_track,
    )  # fmt: skip


def gate_prompts_trusted(
    slack: np.ndarray,
    slo: np.ndarray,
    rem: np.ndarray,
    step_s: np.ndarray,
    new_slo: np.ndarray,
    new_rem: np.ndarray,
    *,
    margin: float = NOISE_MARGIN,
    base_on_track: int | None = None,
) -> np.ndarray:
    """`gate_prompts` without its input checks, for the scheduler's hot path: f64 slack and
    SLOs, i64 remaining tokens, and a step table valid by construction (`StepTimes.seconds()`)."""
    n0, m = slack.shape[0], new_slo.shape[0]
    room = step_s.shape[0] - 1 - n0
    ok = np.zeros(m, bool)
    if m == 0 or room <= 0:
        return ok
    n_all = n0 + min(m, room)
    cap = step_caps(slack, slo, rem, margin)
    all_cap = np.concatenate([cap, new_slo[:room]])
    t_all = step_s[n_all]
    if np.all((all_cap >= t_all) | (all_cap < step_s[1])) and np.all(new_slo[:room] >= t_all):
        ok[:room] = True  # everyone fits in every step: nobody waits
        return ok
    # the decoding requests, then the prompts let in so far (slack 0, no skips), then the trial
    slack_t = np.zeros(n_all)
    slo_t = np.empty(n_all)
    rem_t = np.empty(n_all, np.int64)
    skipped = np.zeros(n_all, np.int64)
    slack_t[:n0], slo_t[:n0], rem_t[:n0] = slack, slo, rem
    base = base_on_track
    if base is None:
        base = pace_step_trusted(slack, slo, rem, skipped[:n0], step_s, margin=margin).on_track
    # A prompt joins with slack 0, so its cap is its SLO whatever its length (`step_caps`),
    # and the most requests on track (pace_step's optimum) never falls as one request's cap
    # grows. So once a prompt is turned away, so is every later prompt whose SLO is no larger
    # (and still at least a one-token step) until another prompt is let in: one trial per
    # SLO class and admission instead of one per waiting prompt (under overload dozens wait).
    one_token = float(step_s[1])
    turned_away = -np.inf  # the largest SLO turned away since the last admission
    n = n0  # requests in the step so far; the trial is entry n
    for j, (s_j, r_j) in enumerate(zip(new_slo.tolist(), new_rem.tolist(), strict=True)):
        if n >= n_all:
            break
        if one_token <= s_j <= turned_away:
            continue
        slo_t[n], rem_t[n] = s_j, r_j
        got = pace_step_trusted(
            slack_t[: n + 1], slo_t[: n + 1], rem_t[: n + 1], skipped[: n + 1], step_s,
            margin=margin,
        ).on_track  # fmt: skip
        # one more on track; a request that cannot attain its SLO even alone comes in when it
        # costs nobody theirs
        if got >= base + (1 if s_j >= one_token else 0):
            ok[j] = True
            n += 1
            base = got
            turned_away = -np.inf
        else:
            turned_away = max(turned_away, s_j)
    return ok


class StepTimes:
    """Seconds of a plain step by tokens carried, as the scheduler experiences them.

    Starts from the latency profile plus its host overhead: each token count priced at the
    compiled bucket it pads to (`padded`, the real engine) or on the interpolated curve (an
    engine that prices every count, e.g. the simulator's paper profile). It then follows the
    plain iterations actually observed (per bucket when padded, per token count otherwise), so
    a stale profile or the host's own time does not mislead pacing. `seconds()` is
    non-decreasing in tokens.

    The update is robust to outliers: each entry is its profile price times the median ratio
    observed / priced over the last `window` observations of its bucket (the window starts
    filled with ratio 1, the profile). Up to `window // 2` slow steps in a row (a shared
    CPU's hiccup: 10 ms among 4 ms steps) leave the estimate where it was, and a lasting
    change of the machine's speed is followed after `window // 2 + 1` steps. A moving average
    jumped 20-30% on such outliers; with a TPOT SLO 1.2x a lone step, that made every tight
    request look unattainable at once (pacing then stops protecting them and lets prompts in).
    """

    def __init__(self, profile, max_tokens: int, *, padded: bool = True, window: int = 5) -> None:
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f"{window=} must be an int >= 1")
        tokens = np.arange(max_tokens + 1)
        buckets = np.asarray(profile.buckets)
        if padded:
            group = np.minimum(np.searchsorted(buckets, tokens), buckets.size - 1)
            priced = np.maximum(buckets[group], tokens)  # past the last bucket: extrapolated
        else:
            group, priced = tokens, np.maximum(tokens, 1)
        self._group = group  # tokens -> the entries one observation updates
        ms = np.asarray(profile.verify.latency_ms(priced.astype(float)), np.float64)
        self._base = (ms + profile.host_ms) / 1e3
        self._s = self._base.copy()
        groups = int(group.max()) + 1
        # each group is a run of consecutive token counts (group is non-decreasing in tokens)
        self._members = [
            slice(*np.flatnonzero(group == g)[[0, -1]] + [0, 1]) for g in range(groups)
        ]
        self._ratios = [[1.0] * window for _ in range(groups)]  # recent ratios per group
        self._next = [0] * groups  # ring position per group
        self._table: np.ndarray | None = None

    def seconds(self) -> np.ndarray:
        """f64[max_tokens + 1]: step seconds by tokens carried (index 0 unused)."""
        if self._table is None:
            self._table = np.maximum.accumulate(self._s)
        return self._table

    def observe(self, tokens: int, seconds: float) -> None:
        if not (0 < tokens < self._s.size) or not np.isfinite(seconds) or seconds <= 0:
            return
        g = int(self._group[tokens])
        ring = self._ratios[g]
        ring[self._next[g] % len(ring)] = seconds / float(self._base[tokens])
        self._next[g] += 1
        ordered = sorted(ring)
        mid = len(ordered) // 2
        median = ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
        same = self._members[g]
        self._s[same] = self._base[same] * median
        self._table = None


def _fill_to(step: np.ndarray, k: int, limit: float) -> int:
    """The most tokens a step with `k` decoding requests may carry within `limit` seconds
    (`step` is non-decreasing from index 1, so the entries within it are a prefix of step[k:])."""
    return k + max(int(np.searchsorted(step[k:], limit, side="right")) - 1, 0)
