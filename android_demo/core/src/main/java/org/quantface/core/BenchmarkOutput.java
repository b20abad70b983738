package org.quantface.core;

import java.util.ArrayList;
import java.util.List;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * Reads LiteRT {@code benchmark_model} output (stdout, or logcat with the "tflite :" prefix):
 * the "Inference timings in us: Init: …, First inference: …, Warmup (avg): …, Inference (avg): …"
 * summary and the per-op "Operator-wise Profiling Info" rows, so the app can show numbers from a
 * benchmark run next to its own. Mirrors toolchain/profile/benchmark_parser.py.
 */
public final class BenchmarkOutput {
    public Double initUs;
    public Double firstUs;
    public Double warmupAvgUs;
    public Double inferenceAvgUs;
    public Double peakMemoryMb;
    public final List<Op> ops = new ArrayList<>();

    /** One row of the "Run Order" op-profiling table. */
    public static final class Op {
        public final String type;
        public final double avgMs;
        public final double percent;
        public final String name;

        Op(String type, double avgMs, double percent, String name) {
            this.type = type;
            this.avgMs = avgMs;
            this.percent = percent;
            this.name = name;
        }
    }

    private static final Pattern TIMINGS = Pattern.compile("Inference timings in us:\\s*(.*)$");
    private static final Pattern FIELD = Pattern.compile("(Init|First inference|Warmup \\(avg\\)|Inference \\(avg\\)|no stats):\\s*([0-9.eE+-]+)");
    private static final Pattern PEAK = Pattern.compile("(?:Overall peak memory footprint \\(MB\\) via periodic monitoring|Peak memory footprint \\(MB\\)):\\s*(?:init=\\S+\\s+overall=)?([0-9.]+)");
    private static final Pattern AVG_LINE = Pattern.compile("count=\\d+\\s+first=\\S+\\s+curr=\\S+\\s+min=\\S+\\s+max=\\S+\\s+avg=([0-9.eE+-]+)");

    private static final Pattern OLD_TIMINGS = Pattern.compile("Average inference timings in us:\\s*(.*)$");
    private static final Pattern OLD_FIELD = Pattern.compile("(Warmup|Init|Inference):\\s*([0-9.eE+-]+)");

    public static BenchmarkOutput parse(String text) {
        BenchmarkOutput b = new BenchmarkOutput();
        boolean regularRuns = false;  // inside "Operator-wise Profiling Info for Regular Benchmark Runs"
        boolean inRunOrder = false;
        int[] cols = {3, 4};  // [avg ms] and [%] columns; older/logcat builds drop the [start] column
        for (String raw : text.split("\r?\n")) {
            String line = stripLogcat(raw);
            Matcher t = TIMINGS.matcher(line);
            if (t.find()) {
                Matcher f = FIELD.matcher(t.group(1));
                while (f.find()) {
                    double v = Double.parseDouble(f.group(2));
                    switch (f.group(1)) {
                        case "Init": b.initUs = v; break;
                        case "First inference": b.firstUs = v; break;
                        case "Warmup (avg)": b.warmupAvgUs = v; break;
                        default: b.inferenceAvgUs = v; break;
                    }
                }
                continue;
            }
            Matcher o = OLD_TIMINGS.matcher(line);
            if (o.find()) {
                Matcher f = OLD_FIELD.matcher(o.group(1));
                while (f.find()) {
                    double v = Double.parseDouble(f.group(2));
                    switch (f.group(1)) {
                        case "Init": b.initUs = v; break;
                        case "Warmup": b.warmupAvgUs = v; break;
                        default: b.inferenceAvgUs = v; break;
                    }
                }
                continue;
            }
            Matcher p = PEAK.matcher(line);
            if (p.find()) {
                b.peakMemoryMb = Double.parseDouble(p.group(1));
                continue;
            }
            if (line.contains("Profiling Info for")) {
                regularRuns = line.contains("Regular Benchmark Runs");
                inRunOrder = false;
                continue;
            }
            if (line.trim().startsWith("=====")) {
                inRunOrder = regularRuns && line.contains("Run Order");
                continue;
            }
            if (inRunOrder && line.contains("[node type]")) {
                cols = headerColumns(line);
                continue;
            }
            if (inRunOrder) {
                Op op = opRow(line, cols);
                if (op != null) {
                    b.ops.add(op);
                }
            }
        }
        if (b.inferenceAvgUs == null) {  // no summary line: fall back to the last per-run stats line
            for (String raw : text.split("\r?\n")) {
                Matcher a = AVG_LINE.matcher(stripLogcat(raw));
                if (a.find()) {
                    b.inferenceAvgUs = Double.parseDouble(a.group(1));
                }
            }
        }
        return b;
    }

    static String stripLogcat(String line) {
        int k = line.indexOf("tflite  :");
        if (k < 0) {
            k = line.indexOf("tflite :");
        }
        return k >= 0 ? line.substring(line.indexOf(':', k) + 1) : line;
    }

    static int[] headerColumns(String header) {
        String[] h = header.trim().split("\\t\\s*");
        int avg = 3;
        int pct = 4;
        for (int k = 0; k < h.length; k++) {
            if (h[k].trim().equals("[avg ms]")) {
                avg = k;
            } else if (h[k].trim().equals("[%]")) {
                pct = k;
            }
        }
        return new int[] {avg, pct};
    }

    /** "CONV_2D\t 0.000\t 4.269\t 4.269\t 5.6%\t …\t[name]:0" → Op, or null for any other line. */
    static Op opRow(String line, int[] cols) {
        String[] c = line.trim().split("\\t\\s*");
        if (c.length <= Math.max(cols[0], cols[1])) {
            return null;
        }
        try {
            String type = c[0].trim();
            if (type.isEmpty() || type.startsWith("[") || !type.matches("[A-Za-z0-9_:/.-]+")) {
                return null;
            }
            double avg = Double.parseDouble(c[cols[0]].trim());
            double pct = Double.parseDouble(c[cols[1]].trim().replace("%", ""));
            return new Op(type, avg, pct, c[c.length - 1].trim());
        } catch (NumberFormatException e) {
            return null;
        }
    }
}
