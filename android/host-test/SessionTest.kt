// The Kotlin API on the host JVM (android/host-test.sh): the generated bindings and Frames.kt,
// through JNA, against the Linux libacclimate_ffi.so on lavapipe. Expected predictions come from
// `cargo run -p acclimate-ffi --example camera_reference` (the library's own API on tightly
// packed frames); here the same bytes are laid out as CameraX delivers them.
// Usage: SessionTestKt MODEL.onnx REFERENCE_DIR SCRATCH_DIR; prints `N passed, M failed`.

import dev.acclimate.AcclimateException
import dev.acclimate.FrameLayout
import dev.acclimate.PixelFormat
import dev.acclimate.Plane
import dev.acclimate.PlaneStrides
import dev.acclimate.Prediction
import dev.acclimate.Session
import dev.acclimate.pushRgba
import dev.acclimate.pushSemiPlanar
import dev.acclimate.pushYuv420
import dev.acclimate.top1
import dev.acclimate.version
import java.io.File
import java.nio.ByteBuffer
import kotlin.system.exitProcess

const val W = 40
const val H = 30
const val CW = W / 2
const val CH = H / 2

/** What the padding bytes hold: a reader that strays into them predicts differently. */
const val PAD_BYTE: Byte = 0x5A

var passed = 0
var failed = 0

fun check(name: String, body: () -> Unit) {
    try {
        body()
        passed++
        println("ok   $name")
    } catch (t: Throwable) {
        failed++
        println("FAIL $name: $t")
    }
}

fun expect(condition: Boolean, message: () -> String) {
    if (!condition) throw AssertionError(message())
}

inline fun <reified T : Throwable> expectThrows(what: String, body: () -> Unit): T {
    try {
        body()
    } catch (t: Throwable) {
        if (t is T) return t
        throw AssertionError("$what: threw ${t.javaClass.name} ($t), not ${T::class.java.name}")
    }
    throw AssertionError("$what: threw nothing, expected ${T::class.java.name}")
}

class Expected(val case: String, val index: Long, val stepped: Boolean, val classes: List<Int>, val probs: List<Float>)

fun readExpected(file: File): List<Expected> = file.readLines().filter { it.isNotBlank() }.map { line ->
    val f = line.split(" ")
    val k = f[3].toInt()
    Expected(
        f[0], f[1].toLong(), f[2] == "1",
        (0 until k).map { f[4 + 2 * it].toInt() },
        (0 until k).map { f[5 + 2 * it].toFloat() },
    )
}

/** Worst probability difference seen against the reference, reported at the end. */
var maxProbDiff = 0f

fun same(p: Prediction, e: Expected, what: String, tol: Float = 1e-6f, checkIndex: Boolean = false) {
    expect(p.classes == e.classes) { "$what: classes ${p.classes}, the library on the packed frame gives ${e.classes}" }
    for (i in e.probs.indices) {
        val d = Math.abs(p.probabilities[i] - e.probs[i])
        maxProbDiff = maxOf(maxProbDiff, d)
        expect(d <= tol) { "$what: probabilities ${p.probabilities}, expected ${e.probs}" }
    }
    if (checkIndex) {
        expect(p.frameIndex == e.index) { "$what: frame index ${p.frameIndex}, expected ${e.index}" }
        expect(p.stepped == e.stepped) { "$what: stepped ${p.stepped}, expected ${e.stepped}" }
    }
}

fun sameAs(a: Prediction, b: Prediction, what: String) {
    expect(a.frameIndex == b.frameIndex && a.stepped == b.stepped && a.classes == b.classes && a.probabilities == b.probabilities) {
        "$what: $a differs from $b"
    }
}

fun direct(size: Int): ByteBuffer = ByteBuffer.allocateDirect(size).also { b -> repeat(size) { b.put(it, PAD_BYTE) } }

/** A plane of [rows] rows of [rowBytes] bytes at [rowStride], the last row unpadded (as CameraX's buffers end). */
fun stridedLength(rows: Int, rowStride: Int, rowBytes: Int) = (rows - 1) * rowStride + rowBytes

/** [chroma]: the whole interleaved buffer the U and V views point into. */
class Yuv(val y: Plane, val u: Plane, val v: Plane, val chroma: ByteBuffer)

/**
 * Frame [i420] (packed) as CameraX delivers YUV_420_888 on most phones: a Y plane with padded
 * rows, and U and V as two views one byte apart into one interleaved chroma buffer (pixel stride
 * 2, padded rows); [vFirst] interleaves V/U (NV21 memory) instead of U/V.
 */
fun cameraxYuv(i420: ByteArray, yPad: Int = 24, cPad: Int = 8, vFirst: Boolean = false): Yuv {
    val yStride = W + yPad
    val y = direct(stridedLength(H, yStride, W))
    for (r in 0 until H) for (c in 0 until W) y.put(r * yStride + c, i420[r * W + c])
    val cStride = 2 * CW + cPad
    val mem = direct(stridedLength(CH, cStride, 2 * CW))
    val uOff = W * H
    val vOff = uOff + CW * CH
    for (r in 0 until CH) for (c in 0 until CW) {
        val first = if (vFirst) i420[vOff + r * CW + c] else i420[uOff + r * CW + c]
        val second = if (vFirst) i420[uOff + r * CW + c] else i420[vOff + r * CW + c]
        mem.put(r * cStride + 2 * c, first)
        mem.put(r * cStride + 2 * c + 1, second)
    }
    // Each view spans from its first sample to its last: (rows-1)*stride + (cols-1)*2 + 1 bytes.
    val viewLen = stridedLength(CH, cStride, 2 * (CW - 1) + 1)
    val at0 = mem.slice(0, viewLen)
    val at1 = mem.slice(1, viewLen)
    val (u, v) = if (vFirst) Pair(at1, at0) else Pair(at0, at1)
    return Yuv(Plane(y, yStride, 1), Plane(u, cStride, 2), Plane(v, cStride, 2), mem)
}

fun Session.pushCamerax(yuv: Yuv, rotation: Int, fullRange: Boolean = false) =
    pushYuv420(W, H, yuv.y, yuv.u, yuv.v, rotationDegrees = rotation, fullRange = fullRange)

/** RGBA with rows padded to [rowStride] bytes; [bgra] swaps R and B. */
fun paddedRgba(rgba: ByteArray, rowStride: Int, bgra: Boolean = false): ByteBuffer {
    val b = direct(stridedLength(H, rowStride, 4 * W))
    for (r in 0 until H) for (c in 0 until W) for (ch in 0 until 4) {
        val src = if (bgra && ch != 3) 2 - ch else ch
        b.put(r * rowStride + 4 * c + ch, rgba[(r * W + c) * 4 + src])
    }
    return b
}

fun main(args: Array<String>) {
    if (args.size != 3) {
        System.err.println("usage: SessionTestKt MODEL.onnx REFERENCE_DIR SCRATCH_DIR")
        exitProcess(2)
    }
    val model = args[0]
    val ref = File(args[1])
    val scratch = File(args[2]).apply { mkdirs() }
    val expected = readExpected(File(ref, "expected.txt"))
    fun case(name: String) = expected.first { it.case == name }
    val tentExpected = expected.filter { it.case == "tent" }
    val source = File(ref, "source.toml").readText()
    val tent = File(ref, "tent.toml").readText()
    val rgba = File(ref, "frame0.rgba").readBytes()
    val frames = (0 until tentExpected.size).map { File(ref, "frame$it.i420").readBytes() }

    check("version") { expect(version().matches(Regex("""\d+\.\d+\.\d+.*"""))) { "version ${version()}" } }

    // Opening the session is a check of its own: when it fails, the ones that need it count as
    // failed too instead of ending the run.
    val opened = try {
        Session(model, source)
    } catch (t: Throwable) {
        println("FAIL open $model: $t")
        failed += 15
        null
    }
    opened?.use { s ->
        check("opens the model: 10 classes") { expect(s.numClasses() == 10) { "numClasses ${s.numClasses()}" } }
        check("RGBA with padded rows predicts as the packed frame") {
            same(s.pushRgba(W, H, paddedRgba(rgba, 4 * W + 12), rowStride = 4 * W + 12), case("rgba_r0"), "rgba r0")
        }
        check("BGRA predicts as RGBA") {
            val p = s.pushRgba(W, H, paddedRgba(rgba, 4 * W, bgra = true), format = PixelFormat.BGRA8)
            same(p, case("rgba_r0"), "bgra r0")
        }
        check("RGBA rotated 90 and mirrored") {
            val p = s.pushRgba(W, H, paddedRgba(rgba, 4 * W), rotationDegrees = 90, mirror = true)
            same(p, case("rgba_r90_mirror"), "rgba r90 mirror")
        }
        for (rotation in listOf(0, 90, 270)) {
            check("CameraX YUV_420_888 (chroma pixel stride 2, padded rows), rotation $rotation") {
                same(s.pushCamerax(cameraxYuv(frames[0]), rotation), case("yuv_r$rotation"), "yuv r$rotation")
            }
        }
        check("CameraX YUV_420_888 with V before U in memory, rotation 270") {
            same(s.pushCamerax(cameraxYuv(frames[0], vFirst = true), 270), case("yuv_r270"), "yuv vu r270")
        }
        check("full-range YUV, rotation 90") {
            same(s.pushCamerax(cameraxYuv(frames[0]), 90, fullRange = true), case("yuv_r90_full"), "yuv full r90")
        }
        check("NV12 and NV21 planes predict as YUV_420_888") {
            // The interleaved chroma buffer is the NV12 (U first) or NV21 (V first) chroma plane.
            val yuv = cameraxYuv(frames[0], vFirst = false)
            same(s.pushSemiPlanar(W, H, yuv.y, Plane(yuv.chroma, yuv.u.rowStride, 2)), case("yuv_r0"), "nv12")
            val vu = cameraxYuv(frames[0], vFirst = true)
            same(s.pushSemiPlanar(W, H, vu.y, Plane(vu.chroma, vu.v.rowStride, 2), vuOrder = true), case("yuv_r0"), "nv21")
        }
        check("a buffer read past its start (position > 0) is sliced, not read from its base") {
            val yuv = cameraxYuv(frames[0])
            val shifted = direct(7 + yuv.y.buffer.capacity())
            for (i in 0 until yuv.y.buffer.capacity()) shifted.put(7 + i, yuv.y.buffer.get(i))
            shifted.position(7)
            val p = s.pushYuv420(W, H, Plane(shifted, yuv.y.rowStride, 1), yuv.u, yuv.v, rotationDegrees = 90)
            same(p, case("yuv_r90"), "yuv r90 from position 7")
        }
        check("a short chroma plane is AcclimateException.Frame naming it; the session goes on") {
            val before = s.stats().frames
            val yuv = cameraxYuv(frames[0])
            val short = yuv.u.buffer.slice(0, yuv.u.buffer.capacity() - 1)
            val e = expectThrows<AcclimateException.Frame>("short U") {
                s.pushYuv420(W, H, yuv.y, Plane(short, yuv.u.rowStride, 2), yuv.v)
            }
            expect(e.message!!.contains("planes[1] (U)") && e.message!!.contains("but len is")) { "message: ${e.message}" }
            val p = s.pushCamerax(yuv, 90)
            same(p, case("yuv_r90"), "the frame after a refused one")
            expect(p.frameIndex == before + 1) { "the refused frame took index $before, the next is ${p.frameIndex}" }
        }
        check("a rotation of 45 degrees and a negative stride are frame errors") {
            val yuv = cameraxYuv(frames[0])
            val r = expectThrows<AcclimateException.Frame>("rotation 45") { s.pushCamerax(yuv, 45) }
            expect(r.message!!.contains("rotation 45")) { "message: ${r.message}" }
            val n = expectThrows<AcclimateException.Frame>("negative row stride") {
                s.pushYuv420(W, H, Plane(yuv.y.buffer, -1, 1), yuv.u, yuv.v)
            }
            expect(n.message!!.contains("row_stride is -1")) { "message: ${n.message}" }
        }
        check("a heap ByteBuffer is refused before the call (IllegalArgumentException), the session goes on") {
            expectThrows<IllegalArgumentException>("heap buffer") { s.pushRgba(W, H, ByteBuffer.wrap(rgba)) }
            same(s.pushRgba(W, H, paddedRgba(rgba, 4 * W)), case("rgba_r0"), "rgba after a heap buffer")
        }
        check("a frame that is too large for its plane is not read past the plane's end") {
            val e = expectThrows<AcclimateException.Frame>("oversized") {
                s.pushRgba(4096, 4096, paddedRgba(rgba, 4 * W))
            }
            expect(e.message!!.contains("reach byte")) { "message: ${e.message}" }
        }
    }

    check("fromBytes opens the same model and predicts the same") {
        Session.fromBytes(File(model).readBytes(), source).use { s ->
            same(s.pushCamerax(cameraxYuv(frames[0]), 90), case("yuv_r90"), "fromBytes yuv r90")
        }
    }

    check("TENT: CameraX frames adapt and predict as the library on packed frames") {
        Session(model, tent).use { s ->
            for ((k, e) in tentExpected.withIndex()) {
                same(s.pushCamerax(cameraxYuv(frames[k]), 90), e, "tent frame $k", tol = 1e-5f, checkIndex = true)
            }
            val st = s.stats()
            expect(st.frames == tentExpected.size.toLong() && st.steps == tentExpected.count { it.stepped }.toLong()) { "stats $st" }
        }
    }

    check("state round trip: a loaded state predicts the next frames exactly as the saved session") {
        val state = File(scratch, "tent.safetensors")
        Session(model, tent).use { s ->
            for (k in 0 until 3) s.pushCamerax(cameraxYuv(frames[k]), 90)
            s.saveState(state.path)
            val after = (3 until frames.size).map { s.pushCamerax(cameraxYuv(frames[it]), 90) }
            expect(after.any { it.stepped }) { "no step after the save: the round trip would test nothing" }
            Session(model, tent).use { t ->
                t.loadState(state.path)
                for ((i, k) in (3 until frames.size).withIndex()) sameAs(t.pushCamerax(cameraxYuv(frames[k]), 90), after[i], "frame $k after loadState")
            }
            s.loadState(state.path)
            for ((i, k) in (3 until frames.size).withIndex()) sameAs(s.pushCamerax(cameraxYuv(frames[k]), 90), after[i], "frame $k, same session")
        }
    }

    check("a corrupt or missing state is AcclimateException, the session is unchanged") {
        val torn = File(scratch, "torn.safetensors").apply { writeBytes(ByteArray(40) { 7 }) }
        Session(model, tent).use { s ->
            s.pushCamerax(cameraxYuv(frames[0]), 90)
            val e = expectThrows<AcclimateException.State>("torn state") { s.loadState(torn.path) }
            expect(e.message!!.startsWith("loadState: ")) { "message: ${e.message}" }
            expectThrows<AcclimateException>("missing state") { s.loadState(File(scratch, "missing.safetensors").path) }
            same(s.pushCamerax(cameraxYuv(frames[1]), 90), tentExpected[1], "frame 1 after the refused loads", tol = 1e-5f, checkIndex = true)
        }
    }

    check("reset restores the unadapted model; frame indices go on") {
        Session(model, tent).use { s ->
            for (k in frames.indices) s.pushCamerax(cameraxYuv(frames[k]), 90)
            s.reset()
            val p = s.pushCamerax(cameraxYuv(frames[0]), 90)
            same(p, tentExpected[0], "frame 0 after reset", tol = 1e-5f)
            expect(p.frameIndex == frames.size.toLong()) { "frame index ${p.frameIndex} after reset" }
        }
    }

    check("compareSource reports the unadapted model's top-1") {
        Session(model, tent, compareSource = true).use { s ->
            val p = s.pushCamerax(cameraxYuv(frames[0]), 90)
            expect(p.sourceClass == case("yuv_r90").classes[0]) { "source class ${p.sourceClass}" }
            expect(p.top1 == tentExpected[0].classes[0]) { "adapted ${p.top1}" }
        }
        Session(model, tent).use { s ->
            expect(s.pushCamerax(cameraxYuv(frames[0]), 90).sourceClass == null) { "source class without compareSource" }
        }
    }

    check("open errors are typed: missing model Io, bad TOML Config, no [preprocess] Config") {
        val io = expectThrows<AcclimateException.Io>("missing model") { Session(File(scratch, "none.onnx").path, source) }
        expect(io.message!!.contains("none.onnx")) { "message: ${io.message}" }
        val toml = expectThrows<AcclimateException.Config>("bad TOML") { Session(model, "[adapt\nmethod = ") }
        expect(toml.message!!.contains("line 1")) { "message: ${toml.message}" }
        val pre = expectThrows<AcclimateException.Config>("no [preprocess]") { Session(model, "[adapt]\nmethod = \"tent\"\n") }
        expect(pre.message!!.contains("[preprocess]")) { "message: ${pre.message}" }
        expectThrows<AcclimateException.Model>("not ONNX") { Session.fromBytes(ByteArray(16) { 1 }, source) }
        expectThrows<AcclimateException.InvalidArgument>("empty path") { Session("", source) }
    }

    check("close twice is fine; a call after close throws IllegalStateException, never crashes") {
        val s = Session(model, source)
        s.pushRgba(W, H, paddedRgba(rgba, 4 * W))
        s.close()
        s.close()
        val e = expectThrows<IllegalStateException>("pushFrame after close") { s.pushRgba(W, H, paddedRgba(rgba, 4 * W)) }
        expect(e.message!!.contains("destroyed")) { "message: ${e.message}" }
        expectThrows<IllegalStateException>("stats after close") { s.stats() }
        expectThrows<IllegalStateException>("saveState after close") { s.saveState(File(scratch, "x").path) }
    }

    check("use {} closes the session") {
        val s = Session(model, source)
        s.use { it.numClasses() }
        expectThrows<IllegalStateException>("after use {}") { s.numClasses() }
    }

    check("a frame layout with its planes in the raw pushFrame call") {
        Session(model, source).use { s ->
            val layout = FrameLayout(W, H, PixelFormat.RGBA8, listOf(PlaneStrides(4 * W, 4)), 0, false, false, 0L)
            val none = ByteBuffer.allocateDirect(0)
            same(s.pushFrame(layout, paddedRgba(rgba, 4 * W), none, none), case("rgba_r0"), "raw pushFrame")
        }
    }

    println("largest probability difference against the reference: $maxProbDiff")
    println("$passed passed, $failed failed")
    exitProcess(if (failed == 0 && passed > 0) 0 else 1)
}
