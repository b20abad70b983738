package org.quantface.demo;

import android.app.Activity;
import android.content.Intent;
import android.graphics.Bitmap;
import android.graphics.BitmapFactory;
import android.net.Uri;
import android.os.Build;
import android.os.Bundle;
import android.util.Log;
import android.view.View;
import android.widget.ArrayAdapter;
import android.widget.Button;
import android.widget.LinearLayout;
import android.widget.ScrollView;
import android.widget.Spinner;
import android.widget.TextView;
import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.EnumSet;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import org.quantface.core.DelegatePlan;
import org.quantface.core.FloatImage;
import org.quantface.core.LatencyStats;
import org.quantface.core.ModelIO;
import org.quantface.core.PrecisionTable;
import org.quantface.core.TimingLog;

/**
 * Pick a face photo, restore it with the exported TFLite model on the chosen accelerator, compare
 * before/after with a slider, and read per-stage latency and the model's bit-width table. Every
 * timed run is also written to logcat in the line format `toolchain profile --adb` reads.
 */
public final class MainActivity extends Activity {
    private static final int PICK_PHOTO = 1;
    private static final int PICK_MODEL = 2;
    private static final int PICK_TABLE = 3;
    private static final int WARMUP = 2;
    private static final int RUNS = 10;

    private final ExecutorService worker = Executors.newSingleThreadExecutor();
    private CompareView compare;
    private TextView status;
    private TextView table;
    private Spinner accelerator;
    private File modelFile;
    private Bitmap photo;

    @Override
    protected void onCreate(Bundle state) {
        super.onCreate(state);
        LinearLayout root = new LinearLayout(this);
        root.setOrientation(LinearLayout.VERTICAL);
        root.setPadding(24, 24, 24, 24);
        LinearLayout buttons = new LinearLayout(this);
        buttons.addView(button("Photo", new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                pick("image/*", PICK_PHOTO);
            }
        }));
        buttons.addView(button("Model", new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                pick("*/*", PICK_MODEL);
            }
        }));
        buttons.addView(button("Table", new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                pick("*/*", PICK_TABLE);
            }
        }));
        buttons.addView(button("Restore", new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                restore();
            }
        }));
        root.addView(buttons);
        accelerator = new Spinner(this);
        accelerator.setAdapter(new ArrayAdapter<>(this, android.R.layout.simple_spinner_dropdown_item, new String[] {"CPU (XNNPACK)", "GPU", "NPU (NNAPI)"}));
        root.addView(accelerator);
        compare = new CompareView(this);
        root.addView(compare);
        status = new TextView(this);
        root.addView(status);
        table = new TextView(this);
        table.setTypeface(android.graphics.Typeface.MONOSPACE);
        ScrollView scroll = new ScrollView(this);
        scroll.addView(table);
        root.addView(scroll);
        setContentView(root);

        String runtime = LiteRtRestorer.runtimeVersion();
        status.setText(runtime != null ? runtime + " present" : "LiteRT runtime is NOT in this build: add the LiteRT dependency (see README) to run models");
        Log.i(TimingLog.TAG, "runtime " + (runtime != null ? runtime + " present" : "missing"));
        loadBundledModel();
    }

    private Button button(String text, View.OnClickListener onClick) {
        Button b = new Button(this);
        b.setText(text);
        b.setOnClickListener(onClick);
        return b;
    }

    private void pick(String mime, int request) {
        Intent i = new Intent(Intent.ACTION_OPEN_DOCUMENT).addCategory(Intent.CATEGORY_OPENABLE).setType(mime);
        startActivityForResult(i, request);
    }

    /** assets/model.tflite (+ model.precision.json) when the APK bundles one; copied so LiteRT can map it. */
    private void loadBundledModel() {
        try (InputStream in = getAssets().open("model.tflite")) {
            modelFile = copy(in, "model.tflite");
            try (InputStream t = getAssets().open("model.precision.json")) {
                showTable(new String(readAll(t), StandardCharsets.UTF_8));
            }
        } catch (IOException none) {
            status.append("\nno bundled model: pick a .tflite exported by `toolchain export --target tflite`");
        }
    }

    @Override
    protected void onActivityResult(int request, int result, Intent data) {
        if (result != RESULT_OK || data == null || data.getData() == null) {
            return;
        }
        Uri uri = data.getData();
        try (InputStream in = getContentResolver().openInputStream(uri)) {
            if (request == PICK_PHOTO) {
                photo = BitmapFactory.decodeStream(in);
                if (photo == null) {
                    status.setText("not an image this device can decode: " + uri);
                    return;
                }
                compare.setImages(photo, null);
            } else if (request == PICK_MODEL) {
                modelFile = copy(in, "picked.tflite");
                status.setText("model: " + uri.getLastPathSegment());
            } else {
                showTable(new String(readAll(in), StandardCharsets.UTF_8));
            }
        } catch (IOException | RuntimeException e) {
            status.setText("could not read " + uri + ": " + e.getMessage());
        }
    }

    private void showTable(String json) {
        try {
            PrecisionTable t = PrecisionTable.parse(json);
            StringBuilder b = new StringBuilder(String.format(Locale.ROOT, "%d layers, average A%.2f, bits→layers %s%n", t.layers.size(),
                    t.averageActivationBits(), t.histogram()));
            if (!t.floatFallbackLayers.isEmpty()) {
                b.append("float fallback: ").append(t.floatFallbackLayers).append('\n');
            }
            for (PrecisionTable.Layer l : t.layers) {
                b.append(String.format(Locale.ROOT, "W%s A%s → %s/%s  %s%n", l.designedWeightBits, l.designedActivationBits,
                        l.executedWeight, l.executedActivation, l.name));
            }
            table.setText(b.toString());
        } catch (IllegalArgumentException e) {
            table.setText("not a QuantFace precision table: " + e.getMessage());
        }
    }

    private void restore() {
        if (modelFile == null || photo == null) {
            status.setText("pick a photo and a model first");
            return;
        }
        final DelegatePlan.Delegate requested = DelegatePlan.Delegate.values()[new int[] {2, 1, 0}[accelerator.getSelectedItemPosition()]];
        final Bitmap input = photo;
        status.setText("running…");
        worker.execute(new Runnable() {
            @Override
            public void run() {
                String report;
                Bitmap restored = null;
                try {
                    Result r = runTimed(input, requested);
                    restored = r.bitmap;
                    report = r.report;
                } catch (Throwable t) {
                    report = "failed: " + t;
                    Log.e(TimingLog.TAG, "restore failed", t);
                }
                final String text = report;
                final Bitmap after = restored;
                runOnUiThread(new Runnable() {
                    @Override
                    public void run() {
                        status.setText(text);
                        if (after != null) {
                            compare.setImages(input, after);
                        }
                    }
                });
            }
        });
    }

    private static final class Result {
        Bitmap bitmap;
        String report;
    }

    private Result runTimed(Bitmap bitmap, DelegatePlan.Delegate requested) {
        EnumSet<DelegatePlan.Delegate> available = EnumSet.of(DelegatePlan.Delegate.GPU);
        if (Build.VERSION.SDK_INT >= 27) {
            available.add(DelegatePlan.Delegate.NPU);
        }
        int threads = Math.max(1, Runtime.getRuntime().availableProcessors() / 2);
        List<String> log = new ArrayList<>();
        String model = modelFile.getName();
        try (LiteRtRestorer r = LiteRtRestorer.open(modelFile, requested, available, threads, log)) {
            int w = bitmap.getWidth();
            int h = bitmap.getHeight();
            int[] argb = new int[w * h];
            long t0 = System.nanoTime();
            bitmap.getPixels(argb, 0, w, 0, 0, w, h);
            ModelIO.Input in = ModelIO.toModelInput(FloatImage.fromArgb(argb, w, h), r.size);
            double pre = ms(t0);
            logTiming("preprocess", 0, pre, r, threads, model);
            LatencyStats inference = new LatencyStats(WARMUP);
            float[] out = null;
            for (int run = 0; run < WARMUP + RUNS; run++) {
                long t = System.nanoTime();
                out = r.run(in.nchw);
                double ms = ms(t);
                inference.add(ms);
                logTiming(run < WARMUP ? "warmup" : "inference", run, ms, r, threads, model);
            }
            long t1 = System.nanoTime();
            FloatImage restored = ModelIO.fromModelOutput(out, r.size, in.placement, h, w);
            Bitmap result = Bitmap.createBitmap(restored.toArgb(), w, h, Bitmap.Config.ARGB_8888);
            double post = ms(t1);
            logTiming("postprocess", 0, post, r, threads, model);
            Result res = new Result();
            res.bitmap = result;
            res.report = String.format(Locale.ROOT, "%s, %d threads: preprocess %.1f ms · inference median %.1f ms (min %.1f, max %.1f, %d runs after %d warm-up; first %.1f ms) · postprocess %.1f ms%n%s",
                    r.used, threads, pre, inference.median(), inference.min(), inference.max(), inference.count(), WARMUP,
                    inference.warmupRuns().get(0), post, log);
            return res;
        }
    }

    private static double ms(long startNanos) {
        return (System.nanoTime() - startNanos) / 1e6;
    }

    private static void logTiming(String stage, int run, double ms, LiteRtRestorer r, int threads, String model) {
        Log.i(TimingLog.TAG, TimingLog.message(stage, run, ms, r.used.name(), threads, model));
    }

    private File copy(InputStream in, String name) throws IOException {
        File f = new File(getFilesDir(), name);
        File tmp = new File(getFilesDir(), name + ".part");
        try (OutputStream out = new FileOutputStream(tmp)) {
            byte[] buf = new byte[1 << 16];
            for (int n; (n = in.read(buf)) > 0; ) {
                out.write(buf, 0, n);
            }
        }
        if (!tmp.renameTo(f)) {
            throw new IOException("cannot move " + tmp + " to " + f);
        }
        return f;
    }

    private static byte[] readAll(InputStream in) throws IOException {
        java.io.ByteArrayOutputStream b = new java.io.ByteArrayOutputStream();
        byte[] buf = new byte[1 << 14];
        for (int n; (n = in.read(buf)) > 0; ) {
            b.write(buf, 0, n);
        }
        return b.toByteArray();
    }

    @Override
    protected void onDestroy() {
        worker.shutdownNow();
        super.onDestroy();
    }
}
