// AVFoundation sample: AVCaptureVideoDataOutput (NV12 420f, late frames dropped) → Session.pushFrame
// on a serial queue → a label with the unadapted (source) model's top-1 next to the adapted one.
// Add this file and AppDelegate.swift to an iOS app target that depends on the package at ios/,
// put mobilenetv2.onnx in the app's bundle, and NSCameraUsageDescription in its Info.plist.
import AVFoundation
import Acclimate
import UIKit

final class CameraViewController: UIViewController, AVCaptureVideoDataOutputSampleBufferDelegate {
    private let capture = AVCaptureSession()
    private let frames = DispatchQueue(label: "dev.acclimate.sample.frames")
    private let label = UILabel()
    private var session: Session?

    // TENT on the last 16 frames, a step every 8th: a prediction every frame, the cost of a
    // step spread over several (README "iOS").
    private static let config = """
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

    override func viewDidLoad() {
        super.viewDidLoad()
        let preview = AVCaptureVideoPreviewLayer(session: capture)
        preview.frame = view.bounds
        preview.videoGravity = .resizeAspectFill
        view.layer.addSublayer(preview)
        label.frame = CGRect(x: 0, y: view.bounds.height - 110, width: view.bounds.width, height: 110)
        label.numberOfLines = 3
        label.font = .monospacedSystemFont(ofSize: 16, weight: .regular)
        label.textColor = .white
        label.backgroundColor = UIColor.black.withAlphaComponent(0.6)
        view.addSubview(label)
        // Opening the session compiles the GPU pipelines: off the main thread.
        frames.async { self.openSession() }
        AVCaptureDevice.requestAccess(for: .video) { granted in
            if granted { self.frames.async { self.startCamera() } } else { self.show("no camera permission") }
        }
    }

    private func openSession() {
        guard let url = Bundle.main.url(forResource: "mobilenetv2", withExtension: "onnx") else {
            show("no mobilenetv2.onnx in the app bundle")
            return
        }
        do {
            session = try Session(modelPath: url.path, configToml: Self.config, compareSource: true)
        } catch {
            show("cannot open the model: \(error)")
        }
    }

    private func startCamera() {
        guard let camera = AVCaptureDevice.default(.builtInWideAngleCamera, for: .video, position: .back),
              let input = try? AVCaptureDeviceInput(device: camera), capture.canAddInput(input) else {
            show("no back camera")
            return
        }
        capture.beginConfiguration()
        capture.sessionPreset = .vga640x480
        capture.addInput(input)
        let output = AVCaptureVideoDataOutput()
        output.videoSettings = [kCVPixelBufferPixelFormatTypeKey as String: kCVPixelFormatType_420YpCbCr8BiPlanarFullRange]
        // A slow step must not queue frames: drop late ones.
        output.alwaysDiscardsLateVideoFrames = true
        output.setSampleBufferDelegate(self, queue: frames)
        if capture.canAddOutput(output) { capture.addOutput(output) }
        capture.commitConfiguration()
        capture.startRunning()
    }

    func captureOutput(_ output: AVCaptureOutput, didOutput sampleBuffer: CMSampleBuffer, from connection: AVCaptureConnection) {
        guard let session = session, let pixels = CMSampleBufferGetImageBuffer(sampleBuffer) else { return }
        let time = CMSampleBufferGetPresentationTimeStamp(sampleBuffer)
        do {
            // The back camera's buffers are landscape: 90° clockwise makes them upright in portrait.
            let p = try session.pushFrame(pixels, rotationDegrees: 90,
                                          timestampNs: Int64(CMTimeGetSeconds(time) * 1e9))
            let source = p.sourceClass.map { "\($0) (\(Int((p.sourceProbability ?? 0) * 100))%)" } ?? "-"
            show("source  \(source)\nadapted \(p.classes[0]) (\(Int(p.probabilities[0] * 100))%)\(p.stepped ? "  step" : "")\n"
                 + "frame \(p.frameIndex), \(String(format: "%.1f", p.latencyMs)) ms")
        } catch AcclimateError.Frame(let message) {
            show("frame skipped: \(message)")
        } catch {
            show("\(error)")
        }
    }

    private func show(_ text: String) {
        DispatchQueue.main.async { self.label.text = text }
    }
}
