package org.tensorflow.lite;

/** Compile-only stub. */
public final class TensorFlowLite {
    private TensorFlowLite() {}

    public static String runtimeVersion() {
        throw new UnsatisfiedLinkError("compile-only stub");
    }
}
