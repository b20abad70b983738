package org.quantface.demo;

import android.content.Context;
import android.graphics.Bitmap;
import android.graphics.Canvas;
import android.graphics.Paint;
import android.graphics.Rect;
import android.graphics.RectF;
import android.view.MotionEvent;
import android.view.View;

/** Before/after with a drag-to-compare divider: left of it the input, right of it the restored image. */
final class CompareView extends View {
    private Bitmap before;
    private Bitmap after;
    private float split = 0.5f;
    private final Paint line = new Paint(Paint.ANTI_ALIAS_FLAG);
    private final Paint label = new Paint(Paint.ANTI_ALIAS_FLAG);

    CompareView(Context context) {
        super(context);
        line.setColor(0xffffffff);
        line.setStrokeWidth(4f);
        label.setColor(0xffffffff);
        label.setTextSize(36f);
        label.setShadowLayer(4f, 0f, 0f, 0xff000000);
    }

    void setImages(Bitmap before, Bitmap after) {
        this.before = before;
        this.after = after;
        invalidate();
    }

    @Override
    protected void onMeasure(int widthSpec, int heightSpec) {
        int w = MeasureSpec.getSize(widthSpec);
        setMeasuredDimension(w, w);  // square, like the model
    }

    @Override
    protected void onDraw(Canvas canvas) {
        if (before == null) {
            return;
        }
        RectF dst = fit(before, getWidth(), getHeight());
        canvas.drawBitmap(before, null, dst, null);
        if (after != null) {
            float x = dst.left + split * dst.width();
            canvas.save();
            canvas.clipRect(x, dst.top, dst.right, dst.bottom);
            canvas.drawBitmap(after, new Rect(0, 0, after.getWidth(), after.getHeight()), dst, null);
            canvas.restore();
            canvas.drawLine(x, dst.top, x, dst.bottom, line);
            canvas.drawText("input", dst.left + 12, dst.top + 44, label);
            canvas.drawText("restored", dst.right - 170, dst.top + 44, label);
        }
    }

    static RectF fit(Bitmap b, int w, int h) {
        float s = Math.min((float) w / b.getWidth(), (float) h / b.getHeight());
        float bw = b.getWidth() * s;
        float bh = b.getHeight() * s;
        return new RectF((w - bw) / 2, (h - bh) / 2, (w + bw) / 2, (h + bh) / 2);
    }

    @Override
    public boolean onTouchEvent(MotionEvent e) {
        if (before == null) {
            return false;
        }
        RectF dst = fit(before, getWidth(), getHeight());
        split = Math.max(0f, Math.min(1f, (e.getX() - dst.left) / dst.width()));
        invalidate();
        return true;
    }
}
