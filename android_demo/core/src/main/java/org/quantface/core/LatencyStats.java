package org.quantface.core;

import java.util.ArrayList;
import java.util.Collections;
import java.util.List;

/** Timings of one stage: the first {@code warmup} runs are recorded apart and excluded from the statistics. */
public final class LatencyStats {
    private final int warmup;
    private final List<Double> warm = new ArrayList<>();
    private final List<Double> runs = new ArrayList<>();

    public LatencyStats(int warmup) {
        if (warmup < 0) {
            throw new IllegalArgumentException("warmup must be >= 0");
        }
        this.warmup = warmup;
    }

    public void add(double ms) {
        if (!(ms >= 0) || Double.isInfinite(ms)) {
            throw new IllegalArgumentException("latency must be a finite non-negative number, got " + ms);
        }
        if (warm.size() < warmup) {
            warm.add(ms);
        } else {
            runs.add(ms);
        }
    }

    public int count() {
        return runs.size();
    }

    public List<Double> warmupRuns() {
        return Collections.unmodifiableList(warm);
    }

    private List<Double> sorted() {
        if (runs.isEmpty()) {
            throw new IllegalStateException("no timed runs after " + warmup + " warm-up runs");
        }
        List<Double> s = new ArrayList<>(runs);
        Collections.sort(s);
        return s;
    }

    /** Median (mean of the two middle values for an even count, as Python's statistics.median). */
    public double median() {
        List<Double> s = sorted();
        int n = s.size();
        return n % 2 == 1 ? s.get(n / 2) : (s.get(n / 2 - 1) + s.get(n / 2)) / 2.0;
    }

    public double min() {
        return sorted().get(0);
    }

    public double max() {
        List<Double> s = sorted();
        return s.get(s.size() - 1);
    }

    public double mean() {
        double sum = 0;
        for (double v : runs) {
            sum += v;
        }
        return sum / sorted().size();
    }

    /** Nearest-rank percentile, p in (0, 100]. */
    public double percentile(double p) {
        if (!(p > 0 && p <= 100)) {
            throw new IllegalArgumentException("percentile must be in (0, 100]");
        }
        List<Double> s = sorted();
        int rank = (int) Math.ceil(p / 100.0 * s.size());
        return s.get(Math.max(0, rank - 1));
    }
}
