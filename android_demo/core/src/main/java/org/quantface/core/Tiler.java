package org.quantface.core;

import java.util.ArrayList;
import java.util.List;

/**
 * Tiling with overlap blending, for photos processed at native resolution with a fixed-size model:
 * tiles of {@code tile}×{@code tile} at a stride of {@code tile − overlap}, the last tile flush
 * with the edge, and per-tile weights that ramp linearly across each overlap so that the weights
 * of all tiles sum to exactly one at every pixel (identity tiles reassemble the image exactly).
 */
public final class Tiler {
    public final int tile;
    public final int overlap;

    public Tiler(int tile, int overlap) {
        if (tile <= 0 || overlap < 0 || overlap >= tile) {
            throw new IllegalArgumentException("need tile > overlap >= 0, got tile=" + tile + " overlap=" + overlap);
        }
        this.tile = tile;
        this.overlap = overlap;
    }

    /** Tile origins along one axis of length n (a single origin 0 when n ≤ tile). */
    public List<Integer> origins(int n) {
        List<Integer> out = new ArrayList<>();
        if (n <= tile) {
            out.add(0);
            return out;
        }
        int stride = tile - overlap;
        for (int o = 0; ; o += stride) {
            if (o + tile >= n) {
                out.add(n - tile);
                break;
            }
            out.add(o);
        }
        return out;
    }

    /** Weight of position i (0..len) of a tile at {@code origin} along an axis with the given neighbours. */
    static float axisWeight(int i, int origin, int len, Integer prevEnd, Integer nextStart) {
        int pos = origin + i;
        float w = 1f;
        if (prevEnd != null && pos < prevEnd) {  // overlap with the previous tile: ramp up
            int span = prevEnd - origin;
            w = Math.min(w, (pos - origin + 0.5f) / span);
        }
        if (nextStart != null && pos >= nextStart) {  // overlap with the next tile: ramp down
            int span = origin + len - nextStart;
            w = Math.min(w, (origin + len - pos - 0.5f) / span);
        }
        return w;
    }

    /** What runs on each tile (a model call); a plain interface because java.util.function needs Android API 24. */
    public interface TileFunction {
        FloatImage apply(FloatImage tile);
    }

    /** Runs {@code fn} on every tile of {@code img} and blends the results into one image of the same size. */
    public FloatImage apply(FloatImage img, TileFunction fn) {
        List<Integer> ys = origins(img.height);
        List<Integer> xs = origins(img.width);
        int th = Math.min(tile, img.height);
        int tw = Math.min(tile, img.width);
        float[] acc = new float[img.data.length];
        float[] norm = new float[img.width * img.height];
        for (int a = 0; a < ys.size(); a++) {
            for (int b = 0; b < xs.size(); b++) {
                int oy = ys.get(a);
                int ox = xs.get(b);
                FloatImage in = FloatImage.blank(tw, th);
                for (int y = 0; y < th; y++) {
                    System.arraycopy(img.data, ((oy + y) * img.width + ox) * 3, in.data, y * tw * 3, tw * 3);
                }
                FloatImage out = fn.apply(in);
                if (out.width != tw || out.height != th) {
                    throw new IllegalStateException("tile function changed the tile size");
                }
                Integer prevY = a > 0 ? ys.get(a - 1) + th : null;
                Integer nextY = a + 1 < ys.size() ? ys.get(a + 1) : null;
                Integer prevX = b > 0 ? xs.get(b - 1) + tw : null;
                Integer nextX = b + 1 < xs.size() ? xs.get(b + 1) : null;
                for (int y = 0; y < th; y++) {
                    float wy = axisWeight(y, oy, th, prevY, nextY);
                    for (int x = 0; x < tw; x++) {
                        float w = wy * axisWeight(x, ox, tw, prevX, nextX);
                        int p = (oy + y) * img.width + ox + x;
                        norm[p] += w;
                        for (int c = 0; c < 3; c++) {
                            acc[3 * p + c] += w * out.data[(y * tw + x) * 3 + c];
                        }
                    }
                }
            }
        }
        for (int p = 0; p < norm.length; p++) {
            for (int c = 0; c < 3; c++) {
                acc[3 * p + c] /= norm[p];
            }
        }
        return new FloatImage(img.width, img.height, acc);
    }
}
