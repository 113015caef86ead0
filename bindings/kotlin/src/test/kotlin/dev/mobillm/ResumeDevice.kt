// The device process of the Kotlin kill-and-resume test (`MobiLlmTest.kt`): a JVM that starts or resumes a
// resumable fine-tune and prints every progress event on stdout, for the test to kill it with SIGKILL at the point
// it waits for. Run as `dev.mobillm.ResumeDeviceKt <state file> fresh|resume`, with the test's environment.

package dev.mobillm

import kotlinx.coroutines.runBlocking

/** The resumable fine-tune both processes run: same examples, same options. */
internal fun resumableOptions(statePath: String) =
    options().copy(maxRounds = 3u, forwardBatch = 4u, statePath = statePath)

/** More than the 256 examples the whitening is fitted on before anything is sent, so a kill late in the
 *  forward finds part of the upload acknowledged. */
internal fun resumableSession(backbone: Backbone, task: Task): FineTuneSession {
    val session = FineTuneSession(backbone, task)
    session.addExamples(examples(400))
    session.addHeldOut(examples(40, offset = 1000))
    return session
}

fun main(args: Array<String>) {
    val (statePath, how) = args
    Backbone.load(System.getenv("MOBILLM_TEST_MODEL")).use { backbone ->
        val task = Task(backbone, "Text: {text}\nIs it pos or neg:", listOf("pos", "neg"))
        val session = resumableSession(backbone, task)
        val listener = object : ProgressListener {
            override fun onProgress(progress: FineTuneProgress) {
                println("event ${progress.phase} ${progress.round} ${progress.done} ${progress.total}")
                System.out.flush()
            }
        }
        val result = runBlocking {
            when (how) {
                "fresh" -> session.fineTune(resumableOptions(statePath), listener)
                else -> session.resume(statePath, resumableOptions(statePath), listener)
            }
        }
        println("outcome ${result.finetunedAccuracy} ${result.resumes} ${result.uploadBytes}")
    }
}
