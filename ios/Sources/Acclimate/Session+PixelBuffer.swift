// Hand-written helpers over the generated bindings (acclimate.swift): a CVPixelBuffer as
// AVCaptureVideoDataOutput delivers it, handed to Session.pushFrame in one call. The planes are
// wrapped, not copied (Data(bytesNoCopy:), passed to Rust as a pointer and a length), and handed
// over inside the base-address lock, which is released when the call has returned.
import CoreVideo
import Foundation

extension Session {
    /// Pushes a camera frame: `kCVPixelFormatType_32BGRA`, or NV12 as
    /// `kCVPixelFormatType_420YpCbCr8BiPlanarFullRange` (`420f`) or `…VideoRange` (`420v`).
    /// `rotationDegrees` brings the frame upright (clockwise: 90 for the back camera's
    /// landscape-right buffers in a portrait app), `mirror` flips it after (front camera).
    public func pushFrame(
        _ pixelBuffer: CVPixelBuffer,
        rotationDegrees: Int32 = 0,
        mirror: Bool = false,
        timestampNs: Int64 = 0
    ) throws -> Prediction {
        guard CVPixelBufferLockBaseAddress(pixelBuffer, .readOnly) == kCVReturnSuccess else {
            throw AcclimateError.Frame(message: "pushFrame: CVPixelBufferLockBaseAddress failed")
        }
        defer { CVPixelBufferUnlockBaseAddress(pixelBuffer, .readOnly) }
        let width = Int32(CVPixelBufferGetWidth(pixelBuffer))
        let height = Int32(CVPixelBufferGetHeight(pixelBuffer))
        let format = CVPixelBufferGetPixelFormatType(pixelBuffer)
        switch format {
        case kCVPixelFormatType_32BGRA:
            let rowBytes = CVPixelBufferGetBytesPerRow(pixelBuffer)
            let plane = try wrap(CVPixelBufferGetBaseAddress(pixelBuffer), rowBytes: rowBytes,
                                 rows: Int(height), what: "BGRA")
            let layout = FrameLayout(
                width: width, height: height, format: .bgra8,
                strides: [PlaneStrides(rowStride: Int32(rowBytes), pixelStride: 4)],
                rotationDegrees: rotationDegrees, mirror: mirror, fullRange: false, timestampNs: timestampNs)
            return try pushFrame(layout: layout, plane0: plane, plane1: Data(), plane2: Data())
        case kCVPixelFormatType_420YpCbCr8BiPlanarFullRange, kCVPixelFormatType_420YpCbCr8BiPlanarVideoRange:
            guard CVPixelBufferGetPlaneCount(pixelBuffer) == 2 else {
                throw AcclimateError.Frame(message: "pushFrame: an NV12 pixel buffer with \(CVPixelBufferGetPlaneCount(pixelBuffer)) planes")
            }
            let yRow = CVPixelBufferGetBytesPerRowOfPlane(pixelBuffer, 0)
            let uvRow = CVPixelBufferGetBytesPerRowOfPlane(pixelBuffer, 1)
            let y = try wrap(CVPixelBufferGetBaseAddressOfPlane(pixelBuffer, 0), rowBytes: yRow,
                             rows: CVPixelBufferGetHeightOfPlane(pixelBuffer, 0), what: "NV12 Y")
            let uv = try wrap(CVPixelBufferGetBaseAddressOfPlane(pixelBuffer, 1), rowBytes: uvRow,
                              rows: CVPixelBufferGetHeightOfPlane(pixelBuffer, 1), what: "NV12 CbCr")
            let layout = FrameLayout(
                width: width, height: height, format: .nv12,
                strides: [PlaneStrides(rowStride: Int32(yRow), pixelStride: 1),
                          PlaneStrides(rowStride: Int32(uvRow), pixelStride: 2)],
                rotationDegrees: rotationDegrees, mirror: mirror,
                fullRange: format == kCVPixelFormatType_420YpCbCr8BiPlanarFullRange, timestampNs: timestampNs)
            return try pushFrame(layout: layout, plane0: y, plane1: uv, plane2: Data())
        default:
            throw AcclimateError.Frame(message: "pushFrame: pixel format \(fourCC(format)) is neither 32BGRA nor 420f/420v: set "
                + "AVCaptureVideoDataOutput.videoSettings[kCVPixelBufferPixelFormatTypeKey] to one of them")
        }
    }
}

/// A plane's bytes as Data over the locked buffer, without a copy: valid until the unlock.
private func wrap(_ base: UnsafeMutableRawPointer?, rowBytes: Int, rows: Int, what: String) throws -> Data {
    guard let base = base else {
        throw AcclimateError.Frame(message: "pushFrame: the \(what) plane has no base address")
    }
    return Data(bytesNoCopy: base, count: rowBytes * rows, deallocator: .none)
}

private func fourCC(_ code: OSType) -> String {
    let bytes = [24, 16, 8, 0].map { UInt8((code >> $0) & 0xFF) }
    return String(bytes: bytes, encoding: .ascii).map { "'\($0)'" } ?? String(code)
}
