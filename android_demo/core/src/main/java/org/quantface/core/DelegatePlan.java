package org.quantface.core;

import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Set;

/**
 * Which accelerators to try, in order, for a user's choice. NPU (NNAPI) falls back to GPU and
 * then CPU; GPU falls back to CPU; CPU (XNNPACK) is always last and always available. The app
 * tries each until one initialises and shows which one ran.
 */
public final class DelegatePlan {
    public enum Delegate { NPU, GPU, CPU }

    private DelegatePlan() {}

    public static List<Delegate> order(Delegate requested, Set<Delegate> available) {
        List<Delegate> out = new ArrayList<>();
        List<Delegate> chain;
        switch (requested) {
            case NPU: chain = java.util.Arrays.asList(Delegate.NPU, Delegate.GPU, Delegate.CPU); break;
            case GPU: chain = java.util.Arrays.asList(Delegate.GPU, Delegate.CPU); break;
            default: chain = Collections.singletonList(Delegate.CPU); break;
        }
        for (Delegate d : chain) {
            if (d == Delegate.CPU || available.contains(d)) {
                out.add(d);
            }
        }
        return out;
    }
}
