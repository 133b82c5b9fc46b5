package dev.acclimate.sample

import android.Manifest
import android.content.pm.PackageManager
import android.os.Bundle
import android.widget.TextView
import androidx.appcompat.app.AppCompatActivity
import androidx.camera.core.CameraSelector
import androidx.camera.core.ImageAnalysis
import androidx.camera.core.Preview
import androidx.camera.lifecycle.ProcessCameraProvider
import androidx.camera.view.PreviewView
import androidx.core.content.ContextCompat
import dev.acclimate.AcclimateException
import dev.acclimate.Session
import dev.acclimate.pushFrame
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors

/**
 * The camera's frames go to an adapting MobileNetV2 session, one pushFrame per frame on a
 * background thread; the overlay shows the unadapted (source) model's top-1 next to the adapted
 * one, so what test-time adaptation changes is visible as the scene (light, blur, noise) shifts.
 */
class MainActivity : AppCompatActivity() {
    private lateinit var overlay: TextView
    private lateinit var analysis: ExecutorService
    private var session: Session? = null

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        overlay = findViewById(R.id.overlay)
        // One thread: pushFrame calls on a session are serialized anyway, and the first one
        // compiles the GPU pipelines, which must stay off the UI thread.
        analysis = Executors.newSingleThreadExecutor()
        analysis.execute { openSession() }
        if (ContextCompat.checkSelfPermission(this, Manifest.permission.CAMERA) == PackageManager.PERMISSION_GRANTED) {
            startCamera()
        } else {
            requestPermissions(arrayOf(Manifest.permission.CAMERA), 1)
        }
    }

    override fun onRequestPermissionsResult(requestCode: Int, permissions: Array<out String>, grantResults: IntArray) {
        super.onRequestPermissionsResult(requestCode, permissions, grantResults)
        if (grantResults.firstOrNull() == PackageManager.PERMISSION_GRANTED) startCamera() else show("no camera permission")
    }

    private fun openSession() {
        try {
            val model = assets.open(MODEL).use { it.readBytes() }
            // TENT on the window of the last 16 frames, a step every 8th frame: predictions every
            // frame, the cost of a step spread over several (README "Android").
            session = Session.fromBytes(model, CONFIG, compareSource = true)
        } catch (e: AcclimateException) {
            show("cannot open $MODEL: ${e.message}")
        } catch (e: java.io.IOException) {
            show("no $MODEL in the app's assets (android/build-aar.sh copies it): ${e.message}")
        }
    }

    private fun startCamera() {
        val future = ProcessCameraProvider.getInstance(this)
        future.addListener({
            val provider = future.get()
            val preview = Preview.Builder().build()
            preview.surfaceProvider = findViewById<PreviewView>(R.id.preview).surfaceProvider
            val analyzer = ImageAnalysis.Builder()
                // A slow step must not queue frames: drop all but the newest one.
                .setBackpressureStrategy(ImageAnalysis.STRATEGY_KEEP_ONLY_LATEST)
                .setOutputImageFormat(ImageAnalysis.OUTPUT_IMAGE_FORMAT_YUV_420_888)
                .build()
            analyzer.setAnalyzer(analysis) { image ->
                image.use { frame ->
                    val s = session ?: return@use
                    try {
                        val p = s.pushFrame(frame)
                        show(
                            "source  ${p.sourceClass ?: "-"} (${pct(p.sourceProbability)})\n" +
                                "adapted ${p.classes.first()} (${pct(p.probabilities.first())})" +
                                (if (p.stepped) "  step" else "") + "\n" +
                                "frame ${p.frameIndex}, ${"%.1f".format(p.latencyMs)} ms"
                        )
                    } catch (e: AcclimateException.Frame) {
                        show("frame skipped: ${e.message}")
                    } catch (e: AcclimateException) {
                        show("${e.javaClass.simpleName}: ${e.message}")
                    }
                }
            }
            provider.unbindAll()
            provider.bindToLifecycle(this, CameraSelector.DEFAULT_BACK_CAMERA, preview, analyzer)
        }, ContextCompat.getMainExecutor(this))
    }

    private fun pct(p: Float?) = if (p == null) "-" else "%.0f%%".format(p * 100)

    private fun show(text: String) = runOnUiThread { overlay.text = text }

    override fun onDestroy() {
        super.onDestroy()
        analysis.execute { session?.close(); session = null }
        analysis.shutdown()
    }

    private companion object {
        const val MODEL = "mobilenetv2.onnx"
        const val CONFIG = """
[adapt]
method = "tent"
[optimizer]
lr = 0.00025
[stream]
window = 16
adapt_every = 8
[preprocess]
spec = "size=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225"
"""
    }
}
