package org.quantface.core;

import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;

/**
 * The per-layer bit-width table that ships beside an exported .tflite — the sidecar
 * {@code MODEL.precision.json} written by {@code toolchain export --target tflite} (format
 * "quantface-tflite-precision"), or a mixed-precision {@code mp_table.json}. The app shows it
 * next to the latency so users see what ran at which precision.
 */
public final class PrecisionTable {
    /** One quantized layer: designed bits and what the runtime executes. */
    public static final class Layer {
        public final String name;
        public final Integer designedActivationBits;
        public final Integer designedWeightBits;
        public final String executedActivation;
        public final String executedWeight;
        public final boolean integer;

        Layer(String name, Integer a, Integer w, String execA, String execW, boolean integer) {
            this.name = name;
            this.designedActivationBits = a;
            this.designedWeightBits = w;
            this.executedActivation = execA;
            this.executedWeight = execW;
            this.integer = integer;
        }
    }

    public final String format;
    public final List<Layer> layers;
    public final List<String> floatFallbackLayers;

    private PrecisionTable(String format, List<Layer> layers, List<String> fallbacks) {
        this.format = format;
        this.layers = Collections.unmodifiableList(layers);
        this.floatFallbackLayers = Collections.unmodifiableList(fallbacks);
    }

    @SuppressWarnings("unchecked")
    public static PrecisionTable parse(String json) {
        Object root = Json.parse(json);
        if (!(root instanceof Map)) {
            throw new IllegalArgumentException("precision table must be a JSON object");
        }
        Map<String, Object> m = (Map<String, Object>) root;
        String format = String.valueOf(m.get("format"));
        List<Layer> out = new ArrayList<>();
        List<String> fallbacks = new ArrayList<>();
        if ("quantface-tflite-precision".equals(format)) {
            Map<String, Object> layers = (Map<String, Object>) require(m, "layers", Map.class);
            for (Map.Entry<String, Object> e : new TreeMap<>(layers).entrySet()) {
                Map<String, Object> r = (Map<String, Object>) e.getValue();
                out.add(new Layer(e.getKey(), intOrNull(r.get("designed_a_bits")), intOrNull(r.get("designed_w_bits")),
                        (String) r.get("executed_activation"), (String) r.get("executed_weight"), Boolean.TRUE.equals(r.get("integer"))));
            }
            Object fb = m.get("float_fallback_layers");
            if (fb instanceof List) {
                for (Object o : (List<Object>) fb) {
                    fallbacks.add(String.valueOf(o));
                }
            }
        } else if (m.get("layers") instanceof List) {  // mp_table.json: [{"name", "a_bits", "w_bits", "targets": {"tflite": {...}}}]
            for (Object o : (List<Object>) m.get("layers")) {
                Map<String, Object> r = (Map<String, Object>) o;
                Map<String, Object> targets = r.get("targets") instanceof Map ? (Map<String, Object>) r.get("targets") : null;
                Map<String, Object> tfl = targets != null && targets.get("tflite") instanceof Map ? (Map<String, Object>) targets.get("tflite") : null;
                out.add(new Layer(String.valueOf(r.get("name")), intOrNull(r.get("a_bits")), intOrNull(r.get("w_bits")),
                        tfl != null ? (String) tfl.get("container") : null, tfl != null ? (String) tfl.get("weight_container") : null,
                        tfl != null && tfl.get("container") != null && String.valueOf(tfl.get("container")).startsWith("int")));
            }
            format = "mp_table";
        } else {
            throw new IllegalArgumentException("not a QuantFace precision table (format '" + format + "')");
        }
        return new PrecisionTable(format, out, fallbacks);
    }

    private static Object require(Map<String, Object> m, String key, Class<?> type) {
        Object v = m.get(key);
        if (!type.isInstance(v)) {
            throw new IllegalArgumentException("precision table: '" + key + "' missing or not a " + type.getSimpleName());
        }
        return v;
    }

    private static Integer intOrNull(Object o) {
        return o instanceof Double ? (int) Math.round((Double) o) : null;
    }

    /** Average designed activation bits over the layers that have one (the paper's "A3.98"). */
    public double averageActivationBits() {
        double sum = 0;
        int n = 0;
        for (Layer l : layers) {
            if (l.designedActivationBits != null) {
                sum += l.designedActivationBits;
                n++;
            }
        }
        return n == 0 ? Double.NaN : sum / n;
    }

    /** Count of layers per designed activation bit-width, for the app's summary line. */
    public Map<Integer, Integer> histogram() {
        Map<Integer, Integer> h = new TreeMap<>();
        for (Layer l : layers) {
            if (l.designedActivationBits != null) {
                Integer n = h.get(l.designedActivationBits);
                h.put(l.designedActivationBits, n == null ? 1 : n + 1);
            }
        }
        return h;
    }
}
