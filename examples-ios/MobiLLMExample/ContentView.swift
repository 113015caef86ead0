// Pick a GGUF model and a JSONL file of {"text","label"} lines, fine-tune through an assist server with a
// progress bar, then classify new text. Texts and labels never leave the phone.

import MobiLLM
import SwiftUI
import UniformTypeIdentifiers

/// Receives progress on the fine-tune's own thread and republishes it on the main actor.
final class ProgressRelay: ProgressListener, @unchecked Sendable {
    let onUpdate: @Sendable (FineTuneProgress) -> Void
    init(onUpdate: @escaping @Sendable (FineTuneProgress) -> Void) { self.onUpdate = onUpdate }
    func onProgress(progress: FineTuneProgress) { onUpdate(progress) }
}

@MainActor
final class Model: ObservableObject {
    @Published var status = "Pick a model"
    @Published var fraction = 0.0
    @Published var running = false
    @Published var prediction = ""
    var backbone: Backbone?
    var adapter: Adapter?
    var cancel: CancelHandle?

    private var adapterURL: URL {
        FileManager.default.urls(for: .applicationSupportDirectory, in: .userDomainMask)[0]
            .appendingPathComponent("adapter.safetensors")
    }

    func loadModel(_ url: URL) async {
        status = "Loading the model…"
        do {
            let path = url.path
            backbone = try await Swift.Task.detached { try Backbone.load(path: path) }.value
            adapter = try? Adapter.load(path: adapterURL.path)
            status = "Model loaded"
        } catch {
            status = "Cannot load the model: \(error)"
        }
    }

    func fineTune(data url: URL, server: String, apiKey: String, template: String) async {
        guard let backbone else { status = "Pick the model first"; return }
        do {
            let lines = try String(contentsOf: url, encoding: .utf8).split(separator: "\n")
            let examples: [LabeledText] = try lines.map { line in
                let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
                return LabeledText(text: object?["text"] as? String ?? "", label: object?["label"] as? String ?? "")
            }
            var labels: [String] = []
            for e in examples where !labels.contains(e.label) { labels.append(e.label) }
            let session = FineTuneSession(
                backbone: backbone, task: try MobiLLM.Task(backbone: backbone, template: template, labels: labels))
            _ = try session.addExamples(examples: examples.enumerated().filter { $0.offset % 5 != 0 }.map(\.element))
            _ = try session.addHeldOut(examples: examples.enumerated().filter { $0.offset % 5 == 0 }.map(\.element))
            cancel = session.cancelHandle()
            running = true
            let relay = ProgressRelay { progress in
                Swift.Task { @MainActor in
                    self.fraction = progress.total > 0 ? Double(progress.done) / Double(progress.total) : 0
                    self.status = "\(progress.phase) \(progress.done)/\(progress.total)"
                }
            }
            let result = try await session.fineTune(
                options: FineTuneOptions(
                    serverUrl: server, apiKey: apiKey, caPem: nil, mode: nil, epochs: nil, maxRounds: nil,
                    learningRate: nil, quantization: nil, width: nil, rank: nil, forwardBatch: nil, pollMillis: nil),
                listener: relay)
            try FileManager.default.createDirectory(
                at: adapterURL.deletingLastPathComponent(), withIntermediateDirectories: true)
            try result.adapter.save(path: adapterURL.path)
            adapter = result.adapter
            status = "Held-out accuracy \(result.zeroShotAccuracy ?? 0) → \(result.finetunedAccuracy ?? 0)"
        } catch MobiLlmError.Cancelled {
            status = "Cancelled"
        } catch {
            status = "Fine-tuning failed: \(error)"
        }
        running = false
    }

    func predict(_ text: String) async {
        guard let backbone, let adapter else { return }
        do {
            let p = try await Swift.Task.detached { try adapter.predict(backbone: backbone, text: text) }.value
            prediction = "\(p.label) \(zip(adapter.labels(), p.scores).map { "\($0) \($1)" }.joined(separator: ", "))"
        } catch {
            prediction = "\(error)"
        }
    }
}

struct ContentView: View {
    @StateObject private var model = Model()
    @State private var server = "https://"
    @State private var apiKey = ""
    @State private var template = "Review: {text}\nSentiment (positive or negative):"
    @State private var input = ""
    @State private var picking: Picking?

    enum Picking { case model, data }

    var body: some View {
        Form {
            Section("Assist server") {
                TextField("URL", text: $server).textInputAutocapitalization(.never)
                SecureField("API key", text: $apiKey)
            }
            Section("Fine-tune") {
                TextField("Prompt template", text: $template, axis: .vertical)
                Button("1. Pick the model (.gguf)") { picking = .model }
                Button("2. Pick labelled texts (.jsonl) and fine-tune") { picking = .data }.disabled(model.running)
                ProgressView(value: model.fraction)
                Text(model.status)
                Button("Cancel") { model.cancel?.cancel() }.disabled(!model.running)
            }
            Section("Predict") {
                TextField("Text to classify", text: $input)
                Button("3. Predict") { Swift.Task { await model.predict(input) } }
                Text(model.prediction)
            }
        }
        .fileImporter(isPresented: Binding(get: { picking != nil }, set: { if !$0 { picking = nil } }),
                      allowedContentTypes: [.data]) { result in
            guard case .success(let url) = result, let what = picking else { return }
            Swift.Task {
                switch what {
                case .model: await model.loadModel(url)
                case .data: await model.fineTune(data: url, server: server, apiKey: apiKey, template: template)
                }
            }
        }
    }
}
