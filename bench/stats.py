"""Statistics the benchmark reports share (imported by the scripts' inline Python)."""
import math
import statistics


def median_ci(values):
    """Distribution-free 95 % interval for the median of `values`: the k-th smallest and k-th
    largest, k the largest with P(Binomial(n, 1/2) < k) <= 2.5 %; None when n < 6."""
    v = sorted(values)
    n, k, tail = len(v), 0, 0.0
    while True:
        tail += math.comb(n, k) / 2**n
        if tail > 0.025:
            break
        k += 1
    return (v[k - 1], v[n - k]) if k > 0 else None


def paired(a, b):
    """Per-round ratios a[r] / b[r] over the rounds both dicts have, their median and its 95 %
    interval (see median_ci): runs of one round are minutes apart at most, so the machine's slow
    drift cancels out of each ratio."""
    v = [a[r] / b[r] for r in a if r in b and b[r] > 0 and not math.isnan(a[r] / b[r])]
    return (statistics.median(v) if v else float("nan")), len(v), median_ci(v)


def fmt_ci(ci):
    """An interval as text."""
    return f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "n too small"
