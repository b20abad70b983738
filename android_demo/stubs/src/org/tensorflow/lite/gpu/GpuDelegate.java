package org.tensorflow.lite.gpu;

import org.tensorflow.lite.Delegate;

/** Compile-only stub. */
public class GpuDelegate implements Delegate {
    public GpuDelegate() {}

    @Override
    public void close() {}
}
