package org.tensorflow.lite;

/** Compile-only stub. */
public interface Tensor {
    int[] shape();
}
