package org.quantface.core;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertNotNull;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.util.ArrayList;
import java.util.EnumSet;
import java.util.List;
import java.util.Map;
import org.junit.Test;

public class ParsingTest {
    @Test
    @SuppressWarnings("unchecked")
    public void jsonParsesTheGrammarAndRejectsGarbage() {
        Map<String, Object> m = (Map<String, Object>) Json.parse("{\"a\": [1, -2.5e3, true, null], \"b\": \"x\\n\\u00e9\\\"\"}");
        assertEquals(-2500.0, ((List<Object>) m.get("a")).get(1));
        assertEquals("x\né\"", m.get("b"));
        for (String bad : new String[] {"{", "[1,]", "{\"a\" 1}", "01", "\"abc", "[1] x", "nul"}) {
            try {
                Json.parse(bad);
                fail("accepted " + bad);
            } catch (IllegalArgumentException expected) {
                assertTrue(expected.getMessage().contains("invalid JSON"));
            }
        }
    }

    @Test
    @SuppressWarnings("unchecked")
    public void precisionSidecarAgreesWithItsMixedPrecisionTable() throws Exception {
        PrecisionTable sidecar = PrecisionTable.parse(Golden.golden("model.precision.json"));
        PrecisionTable table = PrecisionTable.parse(Golden.golden("mp_table.json"));
        assertEquals("quantface-tflite-precision", sidecar.format);
        assertEquals(table.layers.size(), sidecar.layers.size());
        Map<String, Integer> designed = new java.util.HashMap<>();
        for (PrecisionTable.Layer l : table.layers) {
            designed.put(l.name, l.designedActivationBits);
        }
        for (PrecisionTable.Layer l : sidecar.layers) {
            assertEquals(l.name, designed.get(l.name), l.designedActivationBits);
            assertEquals(l.name, l.designedActivationBits <= 8 ? "int8" : "int16", l.executedActivation);
            assertTrue(l.name, l.integer);
        }
        assertTrue(sidecar.floatFallbackLayers.isEmpty());
        assertEquals(table.averageActivationBits(), sidecar.averageActivationBits(), 1e-9);
        Map<Integer, Integer> h = sidecar.histogram();
        assertEquals(sidecar.layers.size(), h.values().stream().mapToInt(Integer::intValue).sum());
        assertEquals(5, h.size());  // the golden table mixes 3, 4, 5, 6 and 8 bits
    }

    @Test(expected = IllegalArgumentException.class)
    public void unknownTableFormatIsRejected() {
        PrecisionTable.parse("{\"format\": \"something-else\", \"layers\": {}}");
    }

    @Test
    public void latencyStatsExcludeWarmup() {
        LatencyStats s = new LatencyStats(2);
        for (double v : new double[] {900, 800, 14, 10, 12, 11, 13}) {
            s.add(v);
        }
        assertEquals(5, s.count());
        assertEquals(12.0, s.median(), 0);
        assertEquals(10.0, s.min(), 0);
        assertEquals(14.0, s.max(), 0);
        assertEquals(12.0, s.mean(), 1e-12);
        assertEquals(14.0, s.percentile(90), 0);
        s.add(15);
        assertEquals(12.5, s.median(), 0);
        try {
            s.add(Double.NaN);
            fail();
        } catch (IllegalArgumentException expected) {
            // NaN timings are refused
        }
    }

    @Test
    public void timingLinesMatchWhatTheProfilerParses() throws Exception {
        List<Map<String, String>> parsed = new ArrayList<>();
        for (String line : Golden.read("tests/data/logcat_demo.txt").split("\n")) {
            Map<String, String> f = TimingLog.parse(line);
            if (f == null) {
                continue;
            }
            parsed.add(f);
            String msg = TimingLog.message(f.get("stage"), Integer.parseInt(f.get("run")), Double.parseDouble(f.get("ms")), f.get("delegate"),
                    Integer.parseInt(f.get("threads")), f.get("model"));
            assertTrue("the app writes exactly this line: " + msg, line.endsWith(TimingLog.TAG + ": " + msg));
        }
        assertEquals(6, parsed.size());
        assertNull(TimingLog.parse("I GpuDelegate: ms=999"));
        assertEquals("a_b", TimingLog.clean("a b"));
    }

    @Test
    public void benchmarkModelOutputsParse() throws Exception {
        BenchmarkOutput b = BenchmarkOutput.parse(Golden.read("tests/data/benchmark_model_mobilenet_op_profiling.txt"));
        assertEquals(17187.0, b.initUs, 0);
        assertEquals(2.95034e6, b.inferenceAvgUs, 1);
        assertEquals(2, b.ops.size());  // regular runs, run order only
        assertEquals("CONV_2D", b.ops.get(0).type);
        assertEquals(60.957, b.ops.get(0).avgMs, 1e-9);
        assertEquals(2.066, b.ops.get(0).percent, 1e-9);

        BenchmarkOutput logcat = BenchmarkOutput.parse(Golden.read("tests/data/benchmark_model_logcat_no_start_column.txt"));
        assertEquals(145528.0, logcat.inferenceAvgUs, 0);
        assertEquals(138.809, logcat.peakMemoryMb, 1e-9);
        assertEquals("[model.unet.down_blocks.0.resnets.0.conv1;2]:5", logcat.ops.get(1).name);
        assertEquals("TfLiteXNNPackDelegate", logcat.ops.get(0).type);
        assertEquals(35.125, logcat.ops.get(1).avgMs, 1e-9);
        assertEquals(24.15, logcat.ops.get(1).percent, 1e-9);

        BenchmarkOutput old = BenchmarkOutput.parse(Golden.read("tests/data/benchmark_model_old_average.txt"));
        assertEquals(79760.9, old.inferenceAvgUs, 1e-6);
        assertNotNull(old.initUs);
    }

    @Test
    public void delegateFallbackOrder() {
        EnumSet<DelegatePlan.Delegate> all = EnumSet.allOf(DelegatePlan.Delegate.class);
        assertEquals(java.util.Arrays.asList(DelegatePlan.Delegate.NPU, DelegatePlan.Delegate.GPU, DelegatePlan.Delegate.CPU),
                DelegatePlan.order(DelegatePlan.Delegate.NPU, all));
        assertEquals(java.util.Arrays.asList(DelegatePlan.Delegate.GPU, DelegatePlan.Delegate.CPU),
                DelegatePlan.order(DelegatePlan.Delegate.NPU, EnumSet.of(DelegatePlan.Delegate.GPU)));
        assertEquals(java.util.Collections.singletonList(DelegatePlan.Delegate.CPU),
                DelegatePlan.order(DelegatePlan.Delegate.GPU, EnumSet.noneOf(DelegatePlan.Delegate.class)));
    }
}
