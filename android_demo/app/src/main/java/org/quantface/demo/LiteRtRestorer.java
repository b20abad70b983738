package org.quantface.demo;

import java.io.File;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.FloatBuffer;
import java.util.List;
import java.util.Set;
import org.quantface.core.DelegatePlan;
import org.tensorflow.lite.Delegate;
import org.tensorflow.lite.Interpreter;
import org.tensorflow.lite.TensorFlowLite;
import org.tensorflow.lite.gpu.GpuDelegate;

/**
 * The only class that touches LiteRT: opens the model on the first accelerator of the fallback
 * order that initialises, and runs one NCHW float tensor through it.
 *
 * <p>A one-file pipeline ({@code toolchain export --part full}) has named signatures: {@code restore}
 * (the whole pipeline) and one per stage. When {@code restore} is present it is looked up by name
 * and run with {@code runSignature}; a single-part file without it runs its only graph as before.
 * The names are the exporter's ({@code export/pipeline.py}: {@code RESTORE}, {@code STAGE_IO}); a
 * pytest checks that these constants still match.
 */
final class LiteRtRestorer implements AutoCloseable {
    static final String RESTORE_SIGNATURE = "restore";
    static final String RESTORE_INPUT = "lq_image";
    static final String RESTORE_OUTPUT = "restored_image";

    private final Interpreter interpreter;
    private final Delegate delegate;
    final DelegatePlan.Delegate used;
    final int size;
    /** True when the model has the {@code restore} signature (run by name), false for a single-graph file. */
    final boolean bySignature;
    private final ByteBuffer input;
    private final ByteBuffer output;

    private LiteRtRestorer(Interpreter interpreter, Delegate delegate, DelegatePlan.Delegate used) {
        this.interpreter = interpreter;
        this.delegate = delegate;
        this.used = used;
        this.bySignature = java.util.Arrays.asList(interpreter.getSignatureKeys()).contains(RESTORE_SIGNATURE);
        int[] shape = (bySignature ? interpreter.getInputTensorFromSignature(RESTORE_INPUT, RESTORE_SIGNATURE)
                : interpreter.getInputTensor(0)).shape();  // [1, 3, S, S]: the exporter keeps PyTorch's NCHW
        if (shape.length != 4 || shape[1] != 3 || shape[2] != shape[3]) {
            throw new IllegalArgumentException("expected a [1,3,S,S] image input, the model has " + java.util.Arrays.toString(shape));
        }
        this.size = shape[2];
        this.input = ByteBuffer.allocateDirect(4 * 3 * size * size).order(ByteOrder.nativeOrder());
        this.output = ByteBuffer.allocateDirect(4 * 3 * size * size).order(ByteOrder.nativeOrder());
    }

    /** "LiteRT x.y.z", or null when the native runtime is not in this build. */
    static String runtimeVersion() {
        try {
            return "LiteRT " + TensorFlowLite.runtimeVersion();
        } catch (Throwable missing) {  // NoClassDefFoundError / UnsatisfiedLinkError
            return null;
        }
    }

    static LiteRtRestorer open(File model, DelegatePlan.Delegate requested, Set<DelegatePlan.Delegate> available, int threads, List<String> log) {
        for (DelegatePlan.Delegate d : DelegatePlan.order(requested, available)) {
            Delegate gpu = null;
            try {
                Interpreter.Options options = new Interpreter.Options().setNumThreads(threads);
                if (d == DelegatePlan.Delegate.GPU) {
                    gpu = new GpuDelegate();
                    options.addDelegate(gpu);
                } else if (d == DelegatePlan.Delegate.NPU) {
                    options.setUseNNAPI(true);
                } else {
                    options.setUseXNNPACK(true);
                }
                LiteRtRestorer r = new LiteRtRestorer(new Interpreter(model, options), gpu, d);
                log.add(d + ": ready (" + r.size + "x" + r.size + (r.bySignature ? ", signature " + RESTORE_SIGNATURE : "") + ")");
                return r;
            } catch (Throwable failed) {
                log.add(d + ": unavailable (" + failed.getClass().getSimpleName() + ": " + failed.getMessage() + ")");
                if (gpu != null) {
                    gpu.close();
                }
            }
        }
        throw new IllegalStateException("no accelerator could run the model: " + log);
    }

    float[] run(float[] nchw) {
        input.rewind();
        input.asFloatBuffer().put(nchw);
        output.rewind();
        if (bySignature) {
            java.util.Map<String, Object> inputs = new java.util.HashMap<String, Object>();
            inputs.put(RESTORE_INPUT, input);
            java.util.Map<String, Object> outputs = new java.util.HashMap<String, Object>();
            outputs.put(RESTORE_OUTPUT, output);
            interpreter.runSignature(inputs, outputs, RESTORE_SIGNATURE);
        } else {
            interpreter.run(input, output);
        }
        float[] out = new float[nchw.length];
        output.rewind();
        FloatBuffer fb = output.asFloatBuffer();
        fb.get(out);
        return out;
    }

    @Override
    public void close() {
        interpreter.close();
        if (delegate != null) {
            delegate.close();
        }
    }
}
