import BackgroundTasks
import SwiftUI
import UIKit

@main
struct MobiLLMExampleApp: App {
    @UIApplicationDelegateAdaptor(AppDelegate.self) private var appDelegate
    @Environment(\.scenePhase) private var scenePhase

    var body: some Scene {
        WindowGroup { ContentView(job: FineTuneJob.shared) }
            .onChange(of: scenePhase) { phase in
                switch phase {
                case .active: FineTuneJob.shared.becomeActive()  // also at launch: resumes a pending fine-tune
                case .background: FineTuneJob.shared.enterBackground()
                default: break
                }
            }
    }
}

/// Registers the background task that resumes the fine-tune. BGTaskScheduler wants every identifier registered
/// before the app finishes launching, and only accepts identifiers that the app's Info.plist lists, under
/// `BGTaskSchedulerPermittedIdentifiers`, with the "processing" background mode:
///
///     <key>BGTaskSchedulerPermittedIdentifiers</key>
///     <array><string>dev.mobillm.example.fine-tune</string></array>
///     <key>UIBackgroundModes</key>
///     <array><string>processing</string></array>
///
/// (In Xcode: the target's Info tab, "Permitted background task scheduler identifiers"; and Signing & Capabilities,
/// Background Modes, "Background processing".)
final class AppDelegate: NSObject, UIApplicationDelegate {
    func application(
        _ application: UIApplication,
        didFinishLaunchingWithOptions launchOptions: [UIApplication.LaunchOptionsKey: Any]? = nil
    ) -> Bool {
        BGTaskScheduler.shared.register(forTaskWithIdentifier: FineTuneJob.taskIdentifier, using: nil) { task in
            guard let task = task as? BGProcessingTask else {
                task.setTaskCompleted(success: false)
                return
            }
            Swift.Task { @MainActor in FineTuneJob.shared.run(task) }
        }
        return true
    }
}
