// Pick a GGUF model and a JSONL file of {"text","label"} lines, fine-tune through an assist server with a
// progress bar, then classify new text. Texts and labels never leave the phone. The fine-tune itself is
// `FineTuneJob`: it outlives the app's visits to the background.

import MobiLLM
import SwiftUI
import UniformTypeIdentifiers

@MainActor
final class Model: ObservableObject {
    @Published var status = "Pick a model"
    @Published var prediction = ""
    @Published private(set) var backbone: Backbone?

    init() {
        // The model of an earlier run.
        if FileManager.default.fileExists(atPath: Files.model.path) {
            Swift.Task { await load { } }
        }
    }

    func loadModel(_ url: URL) async {
        // The backbone is memory-mapped from a file: copy the picked one into Application Support, where the
        // fine-tune loads it too (also when it resumes after a relaunch).
        await load { try Files.copy(picked: url, to: Files.model) }
    }

    private func load(after prepare: @escaping @Sendable () throws -> Void) async {
        status = "Loading the model…"
        do {
            let path = Files.model.path
            backbone = try await Swift.Task.detached {
                try prepare()
                return try Backbone.load(path: path)
            }.value
            status = "Model loaded"
        } catch {
            status = "Cannot load the model: \(error)"
        }
    }

    func predict(_ text: String, adapter: Adapter?) async {
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
    @ObservedObject var job: FineTuneJob
    @StateObject private var model = Model()
    @State private var server = UserDefaults.standard.string(forKey: "server") ?? "https://"
    @State private var apiKey = ""
    @State private var template = UserDefaults.standard.string(forKey: "template")
        ?? "<|im_start|>user\nIs the following review positive or negative?\n{text}<|im_end|>\n<|im_start|>assistant\nThe review is"
    @State private var input = ""
    @State private var picking: Picking?

    enum Picking { case model, data }

    init(job: FineTuneJob) {
        _job = ObservedObject(wrappedValue: job)
    }

    var body: some View {
        Form {
            Section("Assist server") {
                TextField("URL", text: $server).textInputAutocapitalization(.never)
                SecureField("API key", text: $apiKey)
            }
            Section("Fine-tune") {
                TextField("Prompt template", text: $template, axis: .vertical)
                // The model and the examples are the fine-tune's files: not replaced while it runs.
                Button("1. Pick the model (.gguf)") { picking = .model }.disabled(job.running)
                Button("2. Pick labelled texts (.jsonl) and fine-tune") { picking = .data }
                    .disabled(job.running || model.backbone == nil)
                Text(model.status)
                ProgressView(value: job.fraction)
                Text(job.status)
                Button("Cancel") { job.cancel() }.disabled(!job.running)
            }
            Section("Predict") {
                TextField("Text to classify", text: $input)
                Button("3. Predict") { Swift.Task { await model.predict(input, adapter: job.adapter) } }
                Text(model.prediction)
            }
        }
        .fileImporter(isPresented: Binding(get: { picking != nil }, set: { if !$0 { picking = nil } }),
                      allowedContentTypes: [.data]) { result in
            guard case .success(let url) = result, let what = picking else { return }
            switch what {
            case .model:
                Swift.Task { await model.loadModel(url) }
            case .data:
                job.start(data: url, settings: JobSettings(server: server, apiKey: apiKey, template: template))
            }
        }
    }
}
