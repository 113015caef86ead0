// XCTest tests of the Swift bindings, for a Mac with Xcode (no Swift toolchain exists where the SDK is built; there
// these files are only syntax-checked by `cargo xtask swift-check`). They need what `cargo xtask kotlin-test`
// provides the Kotlin tests: MOBILLM_TEST_MODEL (a GGUF, e.g. written by mobillm_core::testkit::write_tiny_gguf),
// MOBILLM_TEST_SERVER and MOBILLM_TEST_KEY (a running mobillm-server), MOBILLM_TEST_TMP (a writable directory).

import Foundation
import XCTest

@testable import MobiLLM

private func env(_ name: String) throws -> String {
    guard let value = ProcessInfo.processInfo.environment[name] else {
        throw XCTSkip("\(name) is not set")
    }
    return value
}

private let labels = ["pos", "neg"]
private let template = "Text: {text}\nIs it pos or neg:"

private func examples(_ n: Int, offset: Int = 0) -> [LabeledText] {
    (offset..<(offset + n)).map { i in
        i % 2 == 0 ? LabeledText(text: "the pos \(i) at it", label: "pos") : LabeledText(text: "on s\(i) re as", label: "neg")
    }
}

private final class Recorder: ProgressListener, @unchecked Sendable {
    private let lock = NSLock()
    private(set) var phases: [FineTunePhase] = []
    func onProgress(progress: FineTuneProgress) {
        lock.lock()
        phases.append(progress.phase)
        lock.unlock()
    }
}

final class MobiLLMTests: XCTestCase {
    func options(server: String, key: String, epochs: UInt32 = 15) -> FineTuneOptions {
        FineTuneOptions(
            serverUrl: server, apiKey: key, caPem: nil, mode: nil, epochs: epochs, maxRounds: 2, learningRate: 0.01,
            quantization: nil, width: 16, rank: 4, forwardBatch: 8, pollMillis: 20)
    }

    func testLoadsModel() throws {
        let backbone = try Backbone.load(path: try env("MOBILLM_TEST_MODEL"))
        XCTAssertEqual(backbone.fingerprint().count, 64)
        XCTAssertGreaterThan(backbone.layers(), 0)
    }

    func testMissingModelIsIoError() throws {
        let tmp = try env("MOBILLM_TEST_TMP")
        XCTAssertThrowsError(try Backbone.load(path: tmp + "/missing.gguf")) { error in
            guard case MobiLlmError.Io = error else { return XCTFail("\(error)") }
        }
    }

    func testUnknownLabelIsRefused() throws {
        let backbone = try Backbone.load(path: try env("MOBILLM_TEST_MODEL"))
        let session = FineTuneSession(backbone: backbone, task: try Task(backbone: backbone, template: template, labels: labels))
        XCTAssertThrowsError(try session.addExample(text: "hmm", label: "maybe"))
        XCTAssertEqual(session.exampleCount(), 0)
    }

    func testFineTunesAndPredicts() async throws {
        let backbone = try Backbone.load(path: try env("MOBILLM_TEST_MODEL"))
        let task = try Task(backbone: backbone, template: template, labels: labels)
        let session = FineTuneSession(backbone: backbone, task: task)
        _ = try session.addExamples(examples: examples(40))
        _ = try session.addHeldOut(examples: examples(12, offset: 100))
        let recorder = Recorder()
        let result = try await session.fineTune(
            options: options(server: try env("MOBILLM_TEST_SERVER"), key: try env("MOBILLM_TEST_KEY")),
            listener: recorder)
        XCTAssertEqual(result.trainSamples, 40)
        XCTAssertEqual(result.validationSamples, 0)
        XCTAssertEqual(result.roundsUsed, 2)
        XCTAssertEqual(recorder.phases.last, .done)
        let prediction = try result.adapter.predict(backbone: backbone, text: "the pos 3 at it")
        XCTAssertTrue(labels.contains(prediction.label))
        XCTAssertEqual(prediction.scores.reduce(0, +), 1.0, accuracy: 1e-4)

        let file = try env("MOBILLM_TEST_TMP") + "/adapter.safetensors"
        try result.adapter.save(path: file)
        let loaded = try Adapter.load(path: file)
        XCTAssertEqual(try loaded.predict(backbone: backbone, text: "the pos 3 at it"), prediction)
    }

    func testCancel() async throws {
        let backbone = try Backbone.load(path: try env("MOBILLM_TEST_MODEL"))
        let session = FineTuneSession(
            backbone: backbone, task: try Task(backbone: backbone, template: template, labels: labels))
        _ = try session.addExamples(examples: examples(40))
        let handle = session.cancelHandle()
        DispatchQueue.global().asyncAfter(deadline: .now() + 1.0) { handle.cancel() }
        do {
            _ = try await session.fineTune(
                options: options(server: try env("MOBILLM_TEST_SERVER"), key: try env("MOBILLM_TEST_KEY"), epochs: 1000),
                listener: nil)
            XCTFail("expected Cancelled")
        } catch MobiLlmError.Cancelled {
        }
    }

    func testWrongKeyIsServerError() async throws {
        let backbone = try Backbone.load(path: try env("MOBILLM_TEST_MODEL"))
        let session = FineTuneSession(
            backbone: backbone, task: try Task(backbone: backbone, template: template, labels: labels))
        _ = try session.addExamples(examples: examples(4))
        do {
            _ = try await session.fineTune(options: options(server: try env("MOBILLM_TEST_SERVER"), key: "nope"), listener: nil)
            XCTFail("expected a server error")
        } catch let MobiLlmError.Server(status, _, _) {
            XCTAssertEqual(status, 401)
        }
    }

    func testDetachedFineTuneResumes() async throws {
        let backbone = try Backbone.load(path: try env("MOBILLM_TEST_MODEL"))
        let task = try Task(backbone: backbone, template: template, labels: labels)
        let session = FineTuneSession(backbone: backbone, task: task)
        _ = try session.addExamples(examples: examples(40))
        let statePath = try env("MOBILLM_TEST_TMP") + "/swift.state"
        var resumable = options(server: try env("MOBILLM_TEST_SERVER"), key: try env("MOBILLM_TEST_KEY"))
        resumable.statePath = statePath
        let handle = session.cancelHandle()
        final class Detacher: ProgressListener, @unchecked Sendable {
            let handle: CancelHandle
            init(_ handle: CancelHandle) { self.handle = handle }
            func onProgress(progress: FineTuneProgress) {
                if progress.phase == .train { handle.detach() }
            }
        }
        do {
            _ = try await session.fineTune(options: resumable, listener: Detacher(handle))
            XCTFail("expected Detached")
        } catch let MobiLlmError.Detached(path, expiresInSeconds, _) {
            XCTAssertEqual(path, statePath)
            XCTAssertGreaterThan(expiresInSeconds, 0)
        }
        XCTAssertTrue(FileManager.default.fileExists(atPath: statePath))
        let result = try await session.resume(statePath: statePath, options: resumable, listener: nil)
        XCTAssertEqual(result.resumes, 1)
        XCTAssertFalse(FileManager.default.fileExists(atPath: statePath))
    }
}
