package org.quantface.core;

/**
 * The model's input and output contract, identical to the Python pipeline
 * ({@code toolchain/pipeline/restore.py}): scale the longer side to the model size, pad to a
 * square by reflection (replication when the pad exceeds the image), NCHW floats in [−1, 1];
 * the output is cropped back, mapped to [0, 1] and resized to the original size.
 */
public final class ModelIO {
    private ModelIO() {}

    /** Where the resized image sits inside the square model input. */
    public static final class Placement {
        public final int top;
        public final int left;
        public final int height;
        public final int width;

        public Placement(int top, int left, int height, int width) {
            this.top = top;
            this.left = left;
            this.height = height;
            this.width = width;
        }
    }

    public static final class Input {
        public final float[] nchw;
        public final Placement placement;
        public final int size;

        Input(float[] nchw, Placement placement, int size) {
            this.nchw = nchw;
            this.placement = placement;
            this.size = size;
        }
    }

    public static Input toModelInput(FloatImage img, int size) {
        if (size <= 0) {
            throw new IllegalArgumentException("model size must be positive");
        }
        double s = (double) size / Math.max(img.height, img.width);
        int nh = roundHalfEven(img.height * s);  // Python's round(): half to even, like Math.rint
        int nw = roundHalfEven(img.width * s);
        FloatImage r = (nh == img.height && nw == img.width) ? img : clamp01(Resize.bicubic(img, nh, nw));
        int top = (size - nh) / 2;
        int left = (size - nw) / 2;
        int bottom = size - nh - top;
        int right = size - nw - left;
        boolean reflect = left < nw && right < nw && top < nh && bottom < nh;
        float[] out = new float[3 * size * size];
        for (int y = 0; y < size; y++) {
            int sy = source(y - top, nh, reflect);
            for (int x = 0; x < size; x++) {
                int sx = source(x - left, nw, reflect);
                for (int c = 0; c < 3; c++) {
                    out[(c * size + y) * size + x] = r.get(sy, sx, c) * 2f - 1f;
                }
            }
        }
        return new Input(out, new Placement(top, left, nh, nw), size);
    }

    static int roundHalfEven(double v) {
        return Math.max(1, (int) Math.rint(v));
    }

    static int source(int i, int n, boolean reflect) {
        if (i >= 0 && i < n) {
            return i;
        }
        if (!reflect || n == 1) {
            return Math.max(0, Math.min(n - 1, i));
        }
        return i < 0 ? -i : 2 * (n - 1) - i;
    }

    static FloatImage clamp01(FloatImage img) {
        for (int i = 0; i < img.data.length; i++) {
            img.data[i] = Math.max(0f, Math.min(1f, img.data[i]));
        }
        return img;
    }

    /** Model output (NCHW, [−1, 1], size×size) → restored image at the original size, [0, 1]. */
    public static FloatImage fromModelOutput(float[] nchw, int size, Placement p, int origHeight, int origWidth) {
        if (nchw.length != 3 * size * size) {
            throw new IllegalArgumentException("model output has " + nchw.length + " values, expected 3x" + size + "x" + size);
        }
        FloatImage crop = FloatImage.blank(p.width, p.height);
        for (int y = 0; y < p.height; y++) {
            for (int x = 0; x < p.width; x++) {
                for (int c = 0; c < 3; c++) {
                    crop.set(y, x, c, (nchw[(c * size + y + p.top) * size + x + p.left] + 1f) / 2f);
                }
            }
        }
        FloatImage out = (p.height == origHeight && p.width == origWidth) ? crop : Resize.bicubic(crop, origHeight, origWidth);
        return clamp01(out);
    }
}
