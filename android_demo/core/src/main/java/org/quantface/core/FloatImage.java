package org.quantface.core;

/** An RGB image as floats in [0, 1], interleaved HWC — the form both the pre/post-processing and the Android Bitmap glue use. */
public final class FloatImage {
    public final int width;
    public final int height;
    public final float[] data;

    public FloatImage(int width, int height, float[] data) {
        if (width <= 0 || height <= 0) {
            throw new IllegalArgumentException("image size must be positive, got " + width + "x" + height);
        }
        if (data.length != width * height * 3) {
            throw new IllegalArgumentException("expected " + (width * height * 3) + " floats for " + width + "x" + height + " RGB, got " + data.length);
        }
        this.width = width;
        this.height = height;
        this.data = data;
    }

    public static FloatImage blank(int width, int height) {
        return new FloatImage(width, height, new float[width * height * 3]);
    }

    /** From packed ARGB pixels (Android's Bitmap.getPixels layout); alpha is ignored, as the Python loader composites RGBA on black. */
    public static FloatImage fromArgb(int[] argb, int width, int height) {
        if (argb.length != width * height) {
            throw new IllegalArgumentException("expected " + (width * height) + " pixels, got " + argb.length);
        }
        float[] d = new float[argb.length * 3];
        for (int i = 0; i < argb.length; i++) {
            int p = argb[i];
            float a = ((p >>> 24) & 0xff) / 255f;
            d[3 * i] = ((p >> 16) & 0xff) / 255f * a;
            d[3 * i + 1] = ((p >> 8) & 0xff) / 255f * a;
            d[3 * i + 2] = (p & 0xff) / 255f * a;
        }
        return new FloatImage(width, height, d);
    }

    /** To opaque packed ARGB, clamped and rounded to 8 bits. */
    public int[] toArgb() {
        int[] out = new int[width * height];
        for (int i = 0; i < out.length; i++) {
            out[i] = 0xff000000 | (to8(data[3 * i]) << 16) | (to8(data[3 * i + 1]) << 8) | to8(data[3 * i + 2]);
        }
        return out;
    }

    static int to8(float v) {
        float c = Math.max(0f, Math.min(1f, v));
        return Math.round(c * 255f);
    }

    public float get(int y, int x, int c) {
        return data[(y * width + x) * 3 + c];
    }

    public void set(int y, int x, int c, float v) {
        data[(y * width + x) * 3 + c] = v;
    }
}
