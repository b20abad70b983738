package org.tensorflow.lite;

/** Compile-only stub of the LiteRT API (never packaged; the real classes come from the LiteRT AAR). */
public interface Delegate extends AutoCloseable {
    @Override
    void close();
}
