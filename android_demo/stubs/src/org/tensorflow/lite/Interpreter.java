package org.tensorflow.lite;

import java.io.File;

/** Compile-only stub of the subset of org.tensorflow.lite.Interpreter the demo uses. */
public class Interpreter implements AutoCloseable {
    public static class Options {
        public Options setNumThreads(int n) { return this; }
        public Options setUseNNAPI(boolean use) { return this; }
        public Options setUseXNNPACK(boolean use) { return this; }
        public Options addDelegate(Delegate d) { return this; }
    }

    public Interpreter(File model, Options options) {
        throw new UnsatisfiedLinkError("compile-only stub");
    }

    public Tensor getInputTensor(int index) { return null; }

    public Tensor getOutputTensor(int index) { return null; }

    public void run(Object input, Object output) {}

    public String[] getSignatureKeys() { return new String[0]; }

    public Tensor getInputTensorFromSignature(String inputName, String signatureKey) { return null; }

    public void runSignature(java.util.Map<String, Object> inputs, java.util.Map<String, Object> outputs, String signatureKey) {}

    @Override
    public void close() {}
}
