package org.quantface.core;

/**
 * Antialiased bicubic resize, the same arithmetic as PyTorch's
 * {@code F.interpolate(mode="bicubic", antialias=True, align_corners=False)} (and PIL's BICUBIC):
 * a = −0.5 cubic kernel stretched by the scale when shrinking, weights normalised per output
 * pixel, applied separably. The Python pipeline uses exactly this, so phone and desktop feed the
 * model the same tensor (checked against golden tensors from Python).
 */
public final class Resize {
    private Resize() {}

    static double cubic(double x) {
        final double a = -0.5;
        x = Math.abs(x);
        if (x < 1.0) {
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
        }
        if (x < 2.0) {
            return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
        }
        return 0.0;
    }

    /** Per output index: first input index, then normalised weights. */
    static final class Taps {
        final int[] start;
        final double[][] weights;

        Taps(int inSize, int outSize) {
            double scale = (double) inSize / outSize;
            double support = scale >= 1.0 ? 2.0 * scale : 2.0;
            double invScale = scale >= 1.0 ? 1.0 / scale : 1.0;
            start = new int[outSize];
            weights = new double[outSize][];
            for (int i = 0; i < outSize; i++) {
                double center = scale * (i + 0.5);
                int xmin = Math.max((int) (center - support + 0.5), 0);
                int xsize = Math.min((int) (center + support + 0.5), inSize) - xmin;
                double[] w = new double[xsize];
                double total = 0.0;
                for (int j = 0; j < xsize; j++) {
                    w[j] = cubic((j + xmin - center + 0.5) * invScale);
                    total += w[j];
                }
                for (int j = 0; j < xsize; j++) {
                    w[j] = total != 0.0 ? w[j] / total : 0.0;
                }
                start[i] = xmin;
                weights[i] = w;
            }
        }
    }

    public static FloatImage bicubic(FloatImage src, int outHeight, int outWidth) {
        if (outHeight <= 0 || outWidth <= 0) {
            throw new IllegalArgumentException("output size must be positive");
        }
        if (outHeight == src.height && outWidth == src.width) {
            return new FloatImage(src.width, src.height, src.data.clone());
        }
        FloatImage horizontal = FloatImage.blank(outWidth, src.height);
        Taps tx = new Taps(src.width, outWidth);
        for (int y = 0; y < src.height; y++) {
            for (int x = 0; x < outWidth; x++) {
                for (int c = 0; c < 3; c++) {
                    double acc = 0.0;
                    double[] w = tx.weights[x];
                    for (int j = 0; j < w.length; j++) {
                        acc += w[j] * src.get(y, tx.start[x] + j, c);
                    }
                    horizontal.set(y, x, c, (float) acc);
                }
            }
        }
        FloatImage out = FloatImage.blank(outWidth, outHeight);
        Taps ty = new Taps(src.height, outHeight);
        for (int y = 0; y < outHeight; y++) {
            double[] w = ty.weights[y];
            for (int x = 0; x < outWidth; x++) {
                for (int c = 0; c < 3; c++) {
                    double acc = 0.0;
                    for (int j = 0; j < w.length; j++) {
                        acc += w[j] * horizontal.get(ty.start[y] + j, x, c);
                    }
                    out.set(y, x, c, (float) acc);
                }
            }
        }
        return out;
    }
}
