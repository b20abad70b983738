package org.quantface.core;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;

import java.util.List;
import java.util.Map;
import org.junit.Test;

public class ModelIOTest {
    @SuppressWarnings("unchecked")
    private static List<Map<String, Object>> cases() throws Exception {
        Map<String, Object> root = (Map<String, Object>) Json.parse(Golden.golden("preprocess.json"));
        return (List<Map<String, Object>>) root.get("cases");
    }

    private static int i(Map<String, Object> c, String k) {
        return ((Double) c.get(k)).intValue();
    }

    @Test
    public void modelInputMatchesThePythonPipeline() throws Exception {
        for (Map<String, Object> c : cases()) {
            FloatImage img = new FloatImage(i(c, "width"), i(c, "height"), Golden.floats(c.get("rgb_hwc")));
            ModelIO.Input in = ModelIO.toModelInput(img, i(c, "size"));
            float[] expected = Golden.floats(c.get("model_input_nchw"));
            assertEquals(expected.length, in.nchw.length);
            assertArrayEquals("case " + c.get("height") + "x" + c.get("width"), expected, in.nchw, 2e-5f);
            float[] place = Golden.floats(c.get("placement"));
            assertEquals((int) place[0], in.placement.top);
            assertEquals((int) place[1], in.placement.left);
            assertEquals((int) place[2], in.placement.height);
            assertEquals((int) place[3], in.placement.width);
        }
    }

    @Test
    public void restoredImageMatchesThePythonPipeline() throws Exception {
        for (Map<String, Object> c : cases()) {
            float[] place = Golden.floats(c.get("placement"));
            ModelIO.Placement p = new ModelIO.Placement((int) place[0], (int) place[1], (int) place[2], (int) place[3]);
            FloatImage out = ModelIO.fromModelOutput(Golden.floats(c.get("model_output_nchw")), i(c, "size"), p, i(c, "height"), i(c, "width"));
            assertEquals(i(c, "width"), out.width);
            assertArrayEquals(Golden.floats(c.get("restored_hwc")), out.data, 2e-5f);
        }
    }

    @Test
    public void resizeKeepsConstantsAndArgbRoundTrips() {
        FloatImage flat = FloatImage.blank(7, 5);
        java.util.Arrays.fill(flat.data, 0.25f);
        FloatImage r = Resize.bicubic(flat, 13, 3);
        for (float v : r.data) {
            assertEquals(0.25f, v, 1e-6f);
        }
        int[] argb = {0xff102030, 0xff000000, 0xffffffff, 0xff7f8081};
        assertArrayEquals(argb, FloatImage.fromArgb(argb, 2, 2).toArgb());
    }

    @Test(expected = IllegalArgumentException.class)
    public void wrongOutputLengthIsRejected() {
        ModelIO.fromModelOutput(new float[10], 4, new ModelIO.Placement(0, 0, 4, 4), 4, 4);
    }

    @Test
    public void transparentPixelsCompositeOnBlack() {
        FloatImage img = FloatImage.fromArgb(new int[] {0x00ffffff}, 1, 1);
        assertTrue(img.data[0] == 0f && img.data[1] == 0f && img.data[2] == 0f);
    }
}
