// Android-only entry points (android.media.Image, CameraX ImageProxy): the host JVM has no
// android.jar, so android/host-test.sh compiles Frames.kt, which these call, and not this file.
package dev.acclimate

import android.graphics.ImageFormat
import android.media.Image
import androidx.camera.core.ImageProxy
import android.graphics.PixelFormat as AndroidPixelFormat

/**
 * Pushes a CameraX frame as it arrives in `ImageAnalysis.Analyzer.analyze`: YUV_420_888 (the
 * default output) or RGBA_8888 (`OUTPUT_IMAGE_FORMAT_RGBA_8888`), rotated by
 * `imageInfo.rotationDegrees`. The planes are read during the call only: close the proxy after
 * it (`image.use { session.pushFrame(it) }`).
 */
fun Session.pushFrame(image: ImageProxy, mirror: Boolean = false, fullRange: Boolean = false): Prediction {
    val p = image.planes
    val rotation = image.imageInfo.rotationDegrees
    val ts = image.imageInfo.timestamp
    return when (image.format) {
        ImageFormat.YUV_420_888 -> pushYuv420(
            image.width, image.height,
            Plane(p[0].buffer, p[0].rowStride, p[0].pixelStride),
            Plane(p[1].buffer, p[1].rowStride, p[1].pixelStride),
            Plane(p[2].buffer, p[2].rowStride, p[2].pixelStride),
            rotationDegrees = rotation, mirror = mirror, fullRange = fullRange, timestampNs = ts,
        )
        AndroidPixelFormat.RGBA_8888 -> pushRgba(
            image.width, image.height, p[0].buffer, p[0].rowStride,
            rotationDegrees = rotation, mirror = mirror, timestampNs = ts,
        )
        else -> throw IllegalArgumentException(
            "ImageProxy format ${image.format} is neither YUV_420_888 nor RGBA_8888: set " +
                "ImageAnalysis.Builder().setOutputImageFormat(OUTPUT_IMAGE_FORMAT_YUV_420_888 or _RGBA_8888)"
        )
    }
}

/**
 * Pushes an `android.media.Image` in YUV_420_888 (Camera2's `ImageReader`), which carries no
 * rotation: pass the one that brings it upright (sensor orientation against the display).
 */
fun Session.pushFrame(image: Image, rotationDegrees: Int, mirror: Boolean = false, fullRange: Boolean = false): Prediction {
    require(image.format == ImageFormat.YUV_420_888) {
        "android.media.Image format ${image.format} is not YUV_420_888 (ImageReader.newInstance(w, h, ImageFormat.YUV_420_888, n))"
    }
    val p = image.planes
    return pushYuv420(
        image.width, image.height,
        Plane(p[0].buffer, p[0].rowStride, p[0].pixelStride),
        Plane(p[1].buffer, p[1].rowStride, p[1].pixelStride),
        Plane(p[2].buffer, p[2].rowStride, p[2].pixelStride),
        rotationDegrees = rotationDegrees, mirror = mirror, fullRange = fullRange, timestampNs = image.timestamp,
    )
}
