package org.quantface.core;

import java.util.LinkedHashMap;
import java.util.Locale;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * The log line the app writes for every timed run, read back by {@code toolchain profile --adb}
 * (toolchain/profile/adb.py, {@code parse_demo_logcat}):
 * {@code QuantFaceDemo: timing stage=<name> run=<i> ms=<float> delegate=<name> threads=<n> model=<file>}.
 * Values never contain spaces (they are sanitised), so the line splits on whitespace.
 */
public final class TimingLog {
    public static final String TAG = "QuantFaceDemo";
    private static final Pattern LINE = Pattern.compile("QuantFaceDemo\\s*:?\\s*timing\\s+(.*)$");

    private TimingLog() {}

    /** The message part (logcat adds "TAG: " in front, so the app logs this with Log.i(TAG, ...)). */
    public static String message(String stage, int run, double ms, String delegate, int threads, String model) {
        return String.format(Locale.ROOT, "timing stage=%s run=%d ms=%.3f delegate=%s threads=%d model=%s",
                clean(stage), run, ms, clean(delegate), threads, clean(model));
    }

    static String clean(String v) {
        return v == null || v.isEmpty() ? "-" : v.replaceAll("[\\s=]+", "_");
    }

    /** Fields of one logcat line, or null when the line is not a timing line. */
    public static Map<String, String> parse(String line) {
        Matcher m = LINE.matcher(line);
        if (!m.find()) {
            return null;
        }
        Map<String, String> out = new LinkedHashMap<>();
        for (String kv : m.group(1).trim().split("\\s+")) {
            int eq = kv.indexOf('=');
            if (eq > 0) {
                out.put(kv.substring(0, eq), kv.substring(eq + 1));
            }
        }
        return out;
    }
}
