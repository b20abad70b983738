package org.quantface.core;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;

import java.util.Arrays;
import java.util.Random;
import org.junit.Test;

public class TilerTest {
    private static FloatImage random(int w, int h, long seed) {
        Random r = new Random(seed);
        float[] d = new float[w * h * 3];
        for (int k = 0; k < d.length; k++) {
            d[k] = r.nextFloat();
        }
        return new FloatImage(w, h, d);
    }

    @Test
    public void originsCoverTheAxisAndEndFlush() {
        Tiler t = new Tiler(8, 2);
        assertEquals(Arrays.asList(0), t.origins(5));
        assertEquals(Arrays.asList(0, 6, 7), t.origins(15));
        assertEquals(Arrays.asList(0, 6, 12), t.origins(20));
    }

    @Test
    public void identityTilesReassembleTheImageExactly() {
        FloatImage img = random(23, 17, 1);
        FloatImage out = new Tiler(8, 3).apply(img, tile -> tile);
        assertArrayEquals(img.data, out.data, 1e-6f);
    }

    @Test
    public void overlapsBlendSmoothlyBetweenTiles() {
        // every tile returns a constant equal to its index: the blend must stay within the range
        // and, across an overlap, move monotonically from one tile's value to the next
        FloatImage img = FloatImage.blank(20, 8);
        int[] counter = {0};
        FloatImage out = new Tiler(8, 4).apply(img, tile -> {
            FloatImage t = FloatImage.blank(tile.width, tile.height);
            Arrays.fill(t.data, counter[0]++);
            return t;
        });
        float prev = -1f;
        for (int x = 0; x < 20; x++) {
            float v = out.get(3, x, 0);
            assertTrue(v >= 0f && v <= counter[0] - 1);
            assertTrue("non-decreasing across tiles at x=" + x, v >= prev - 1e-6f);
            prev = v;
        }
        assertEquals(0f, out.get(0, 0, 0), 0f);
        assertEquals(counter[0] - 1, out.get(0, 19, 0), 1e-6f);
    }

    @Test(expected = IllegalArgumentException.class)
    public void overlapMustBeSmallerThanTheTile() {
        new Tiler(8, 8);
    }
}
