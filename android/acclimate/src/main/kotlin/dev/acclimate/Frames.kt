// Hand-written helpers over the generated bindings (acclimate.kt): camera planes as Android
// delivers them, handed to Session.pushFrame in one call, without copying them. Plain JVM code
// (no android.* imports), so android/host-test.sh compiles and tests it on the host; the
// ImageProxy / android.media.Image entry points are in CameraFrames.kt (Android only).
package dev.acclimate

import java.nio.ByteBuffer

/**
 * One image plane: a direct [buffer] (as `Image.Plane.getBuffer()` returns it; heap buffers are
 * refused with IllegalArgumentException) and its strides in bytes.
 */
class Plane(val buffer: ByteBuffer, val rowStride: Int, val pixelStride: Int)

/** What unused plane arguments get: the generated code requires a direct buffer. */
private val NO_PLANE: ByteBuffer = ByteBuffer.allocateDirect(0)

/**
 * The bytes from the buffer's position on, as a buffer that starts there: the generated code
 * passes a direct buffer's base address and `remaining()` bytes and ignores the position, so a
 * buffer that was read from (position > 0) is sliced first (a view, not a copy).
 */
internal fun ByteBuffer.atPosition(): ByteBuffer = if (position() == 0) this else slice()

/**
 * Pushes a YUV_420_888 frame (`android.media.Image` / CameraX `ImageProxy` planes, in their
 * order Y, U, V): each plane with its own row and pixel stride, so semi-planar images (U and V
 * interleaved, pixel stride 2, as most cameras deliver them) and padded rows go as they are.
 * [rotationDegrees] is CameraX's `imageInfo.rotationDegrees`; [fullRange]: samples in 0-255
 * rather than video range (BT.601 either way).
 */
fun Session.pushYuv420(
    width: Int,
    height: Int,
    y: Plane,
    u: Plane,
    v: Plane,
    rotationDegrees: Int = 0,
    mirror: Boolean = false,
    fullRange: Boolean = false,
    timestampNs: Long = 0,
): Prediction {
    val layout = FrameLayout(
        width = width,
        height = height,
        format = PixelFormat.YUV420,
        strides = listOf(y.strides(), u.strides(), v.strides()),
        rotationDegrees = rotationDegrees,
        mirror = mirror,
        fullRange = fullRange,
        timestampNs = timestampNs,
    )
    return pushFrame(layout, y.buffer.atPosition(), u.buffer.atPosition(), v.buffer.atPosition())
}

/**
 * Pushes a packed 4-byte-per-pixel frame: RGBA (CameraX `OUTPUT_IMAGE_FORMAT_RGBA_8888`, a
 * `Bitmap`'s ARGB_8888 bytes from `copyPixelsToBuffer`) or, with [format] `PixelFormat.BGRA8`,
 * BGRA. [rowStride] 0: rows of exactly `width * 4` bytes.
 */
fun Session.pushRgba(
    width: Int,
    height: Int,
    pixels: ByteBuffer,
    rowStride: Int = 0,
    rotationDegrees: Int = 0,
    mirror: Boolean = false,
    timestampNs: Long = 0,
    format: PixelFormat = PixelFormat.RGBA8,
): Prediction {
    require(format == PixelFormat.RGBA8 || format == PixelFormat.BGRA8) { "pushRgba takes RGBA8 or BGRA8, not $format" }
    val layout = FrameLayout(
        width = width,
        height = height,
        format = format,
        strides = listOf(PlaneStrides(rowStride = rowStride, pixelStride = 4)),
        rotationDegrees = rotationDegrees,
        mirror = mirror,
        fullRange = false,
        timestampNs = timestampNs,
    )
    return pushFrame(layout, pixels.atPosition(), NO_PLANE, NO_PLANE)
}

/** Pushes an NV12 (U/V pairs) or, with [vuOrder], NV21 frame: a Y plane and one chroma plane. */
fun Session.pushSemiPlanar(
    width: Int,
    height: Int,
    y: Plane,
    chroma: Plane,
    vuOrder: Boolean = false,
    rotationDegrees: Int = 0,
    mirror: Boolean = false,
    fullRange: Boolean = false,
    timestampNs: Long = 0,
): Prediction {
    val layout = FrameLayout(
        width = width,
        height = height,
        format = if (vuOrder) PixelFormat.NV21 else PixelFormat.NV12,
        strides = listOf(y.strides(), chroma.strides()),
        rotationDegrees = rotationDegrees,
        mirror = mirror,
        fullRange = fullRange,
        timestampNs = timestampNs,
    )
    return pushFrame(layout, y.buffer.atPosition(), chroma.buffer.atPosition(), NO_PLANE)
}

private fun Plane.strides() = PlaneStrides(rowStride = rowStride, pixelStride = pixelStride)

/** The predicted class (the most probable one). */
val Prediction.top1: Int get() = classes.first()

/** Its probability. */
val Prediction.top1Probability: Float get() = probabilities.first()
