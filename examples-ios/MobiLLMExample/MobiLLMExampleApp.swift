import SwiftUI

@main
struct MobiLLMExampleApp: App {
    var body: some Scene {
        WindowGroup { ContentView() }
    }
}
