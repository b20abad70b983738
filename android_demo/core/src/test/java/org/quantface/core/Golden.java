package org.quantface.core;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.List;

/** Locates the golden files (produced by android_demo/tools/make_golden.py) and the repo's tests/data samples. */
final class Golden {
    private Golden() {}

    static Path repo() {
        return Paths.get(System.getProperty("quantface.repo", "../..")).toAbsolutePath().normalize();
    }

    static String read(String relative) throws IOException {
        return new String(Files.readAllBytes(repo().resolve(relative)), StandardCharsets.UTF_8);
    }

    static String golden(String name) throws IOException {
        return read("android_demo/core/src/test/resources/golden/" + name);
    }

    static float[] floats(Object jsonList) {
        List<?> l = (List<?>) jsonList;
        float[] out = new float[l.size()];
        for (int i = 0; i < out.length; i++) {
            out[i] = ((Double) l.get(i)).floatValue();
        }
        return out;
    }
}
