// The example's fine-tune, resumable. Its state file in Application Support records every acknowledged step, so
// the fine-tune survives the app: when iOS takes back the app's background time or ends a background task, the
// fine-tune is detached (the server trains on); when the app is next active, or iOS runs the background task, it
// resumes from where it stopped. A kill loses nothing either: the state file is written atomically.

import BackgroundTasks
import Foundation
import MobiLLM
import UIKit

/// Receives progress on the fine-tune's own thread and republishes it on the main actor.
final class ProgressRelay: ProgressListener, @unchecked Sendable {
    let onUpdate: @Sendable (FineTuneProgress) -> Void
    init(onUpdate: @escaping @Sendable (FineTuneProgress) -> Void) { self.onUpdate = onUpdate }
    func onProgress(progress: FineTuneProgress) { onUpdate(progress) }
}

/// The example's files, in Application Support (private to the app; readable after the first unlock, so also by
/// a background task while the phone is locked).
enum Files {
    static var directory: URL {
        FileManager.default.urls(for: .applicationSupportDirectory, in: .userDomainMask)[0]
    }
    static var model: URL { directory.appendingPathComponent("model.gguf") }
    static var examples: URL { directory.appendingPathComponent("examples.jsonl") }
    static var state: URL { directory.appendingPathComponent("fine-tune.state") }
    static var adapter: URL { directory.appendingPathComponent("adapter.sealed") }

    /// Replaces `destination` with a copy of a file the user picked.
    static func copy(picked url: URL, to destination: URL) throws {
        let scoped = url.startAccessingSecurityScopedResource()
        defer { if scoped { url.stopAccessingSecurityScopedResource() } }
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        try? FileManager.default.removeItem(at: destination)
        try FileManager.default.copyItem(at: url, to: destination)
    }

    /// Deletes the state file and its sibling `<state>.tensors` (the SDK's own files; either may be missing).
    static func removeState() {
        try? FileManager.default.removeItem(at: state)
        try? FileManager.default.removeItem(at: URL(fileURLWithPath: state.path + ".tensors"))
    }
}

/// What the fine-tune was started with, kept so that a resume after a relaunch gives the same options.
struct JobSettings {
    var server: String
    var apiKey: String
    var template: String

    func save() throws {
        UserDefaults.standard.set(server, forKey: "server")
        UserDefaults.standard.set(template, forKey: "template")
        try Keychain.write(Data(apiKey.utf8), as: "apiKey")
    }

    static func load() throws -> JobSettings? {
        guard let server = UserDefaults.standard.string(forKey: "server"),
              let template = UserDefaults.standard.string(forKey: "template"),
              let apiKey = try Keychain.read("apiKey")
        else { return nil }
        return JobSettings(server: server, apiKey: String(decoding: apiKey, as: UTF8.self), template: template)
    }
}

@MainActor
final class FineTuneJob: ObservableObject {
    static let shared = FineTuneJob()
    /// The background task that resumes the fine-tune; registered in `AppDelegate` and listed in Info.plist.
    nonisolated static let taskIdentifier = "dev.mobillm.example.fine-tune"

    @Published private(set) var status = ""
    @Published private(set) var fraction = 0.0
    @Published private(set) var running = false
    @Published private(set) var adapter: Adapter?

    private var current: Swift.Task<Void, Never>?
    private var handle: CancelHandle?
    private var backgroundTime = UIBackgroundTaskIdentifier.invalid

    /// A fine-tune was started and has not ended: its state file is there.
    var pending: Bool { FileManager.default.fileExists(atPath: Files.state.path) }

    private init() {
        adapter = try? Adapter.load(path: Files.adapter.path, key: Keychain.key(named: "adapter"))
    }

    /// Starts a fine-tune on a picked JSONL file of {"text","label"} lines (the model is already in `Files.model`).
    func start(data url: URL, settings: JobSettings) {
        guard !running else { return }
        do {
            try Files.copy(picked: url, to: Files.examples)
            try settings.save()
        } catch {
            status = "Cannot keep the examples: \(error)"
            return
        }
        launch()
    }

    func cancel() { handle?.cancel() }

    func detach() { handle?.detach() }

    /// The app is in the foreground: resume a fine-tune that was put down or cut short.
    func becomeActive() {
        endBackgroundTime()
        if pending { launch() }
    }

    /// The app went to the background, where iOS suspends it within seconds unless it asks for time. Ask for that
    /// time, detach when it runs out, and schedule the background task that resumes the fine-tune.
    func enterBackground() {
        guard running else { return }
        scheduleBackgroundResume()
        guard backgroundTime == .invalid else { return }
        backgroundTime = UIApplication.shared.beginBackgroundTask(withName: "MobiLLM fine-tune") {
            // On the main thread, shortly before the time runs out. The state file already holds the last
            // acknowledged step: detaching ends the run cleanly (within one batch or one poll) rather than
            // freezing it in the middle of a request.
            MainActor.assumeIsolated {
                FineTuneJob.shared.detach()
                FineTuneJob.shared.endBackgroundTime()
            }
        }
    }

    /// Runs the background task: resumes the fine-tune, and detaches it when iOS ends the task.
    func run(_ task: BGProcessingTask) {
        task.expirationHandler = {
            Swift.Task { @MainActor in FineTuneJob.shared.detach() }
        }
        if pending { launch() }
        let current = self.current
        Swift.Task {
            await current?.value
            task.setTaskCompleted(success: !pending)
        }
    }

    private func endBackgroundTime() {
        guard backgroundTime != .invalid else { return }
        UIApplication.shared.endBackgroundTask(backgroundTime)
        backgroundTime = .invalid
    }

    /// One fine-tune run at a time; a second caller shares the one under way.
    private func launch() {
        guard current == nil else { return }
        running = true
        current = Swift.Task {
            let detached = await fineTune()
            current = nil
            running = false
            endBackgroundTime()
            // The app came back while a detach was under way: go on at once.
            if detached && UIApplication.shared.applicationState == .active { launch() }
        }
    }

    /// Resumes the fine-tune if its state file is there, or starts it. Returns whether it was detached.
    private func fineTune() async -> Bool {
        do {
            guard let settings = try JobSettings.load() else {
                status = "Pick labelled texts to fine-tune on"
                return false
            }
            let modelPath = Files.model.path
            let backbone = try await Swift.Task.detached { try Backbone.load(path: modelPath) }.value
            let examples = try Self.readExamples(Files.examples)
            var labels: [String] = []
            for e in examples where !labels.contains(e.label) { labels.append(e.label) }
            let session = FineTuneSession(
                backbone: backbone,
                task: try MobiLLM.Task(backbone: backbone, template: settings.template, labels: labels))
            // The same split on every run: resuming needs the same training examples.
            _ = try session.addExamples(examples: examples.enumerated().filter { $0.offset % 5 != 0 }.map(\.element))
            _ = try session.addHeldOut(examples: examples.enumerated().filter { $0.offset % 5 == 0 }.map(\.element))
            handle = session.cancelHandle()
            defer { handle = nil }
            let options = FineTuneOptions(
                serverUrl: settings.server, apiKey: settings.apiKey,
                statePath: Files.state.path, stateKey: try Keychain.key(named: "state"))
            let relay = ProgressRelay { progress in
                Swift.Task { @MainActor in FineTuneJob.shared.show(progress) }
            }
            let result = try await resumeOrStart(session, options: options, listener: relay)
            try result.adapter.save(path: Files.adapter.path, key: try Keychain.key(named: "adapter"))
            adapter = result.adapter
            fraction = 1
            status = "Held-out accuracy \(Self.percent(result.zeroShotAccuracy)) → "
                + "\(Self.percent(result.finetunedAccuracy)) (resumed \(result.resumes) times)"
            BGTaskScheduler.shared.cancel(taskRequestWithIdentifier: Self.taskIdentifier)
        } catch MobiLlmError.Detached(_, let expiresInSeconds, _) {
            status = "Put down; the server trains on. Resumes when the app is back or iOS runs the background task "
                + "(the server keeps the session for \(expiresInSeconds / 3600) h without a request)."
            scheduleBackgroundResume()
            return true
        } catch MobiLlmError.Network(let reason) {
            // The state file holds the last acknowledged step: the next run goes on from there.
            status = "Network failed (\(reason)); the fine-tune resumes later"
            scheduleBackgroundResume()
        } catch MobiLlmError.Cancelled {
            status = "Cancelled"
        } catch let error as MobiLlmError {
            // Failed for good: the next fine-tune starts afresh.
            Files.removeState()
            status = "Fine-tuning failed: \(error)"
        } catch {
            status = "Fine-tuning failed: \(error)"
        }
        return false
    }

    private func resumeOrStart(
        _ session: FineTuneSession, options: FineTuneOptions, listener: ProgressListener
    ) async throws -> FineTuneResult {
        if pending {
            do {
                return try await session.resume(statePath: Files.state.path, options: options, listener: listener)
            } catch MobiLlmError.CannotResume(let reason) {
                // The server session expired (24 h without a request, by default), or the model, the examples, the
                // options or the key changed since the state file was written: nothing to continue.
                status = "Cannot resume (\(reason)); starting again"
                Files.removeState()
            }
        }
        return try await session.fineTune(options: options, listener: listener)
    }

    private func show(_ progress: FineTuneProgress) {
        fraction = progress.total > 0 ? Double(progress.done) / Double(progress.total) : 0
        status = "\(progress.phase) \(progress.done)/\(progress.total) (round \(progress.round))"
    }

    private func scheduleBackgroundResume() {
        let request = BGProcessingTaskRequest(identifier: Self.taskIdentifier)
        request.requiresNetworkConnectivity = true
        do {
            try BGTaskScheduler.shared.submit(request)
        } catch {
            // The Simulator has no background tasks, nor has an app without the Info.plist entry: the fine-tune
            // then resumes when the app is next active.
            status += " (no background task: \(error.localizedDescription))"
        }
    }

    private static func readExamples(_ url: URL) throws -> [LabeledText] {
        try String(contentsOf: url, encoding: .utf8).split(separator: "\n").map { line in
            let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
            return LabeledText(text: object?["text"] as? String ?? "", label: object?["label"] as? String ?? "")
        }
    }

    private static func percent(_ x: Double?) -> String {
        x.map { String(format: "%.1f%%", $0 * 100) } ?? "n/a"
    }
}
