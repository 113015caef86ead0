// Tests of the generated Kotlin bindings against the real library, a tiny generated model and a real assist
// server on 127.0.0.1 (all provided by `cargo xtask kotlin-test` through environment variables). The runner is
// `main` below: it prints one line per test and `N passed, M failed`, and exits non-zero on any failure.

package dev.mobillm

import java.io.File
import java.util.Collections
import java.util.concurrent.Executors
import java.util.concurrent.TimeUnit
import kotlin.concurrent.thread
import kotlin.system.exitProcess
import kotlin.test.assertEquals
import kotlin.test.assertFailsWith
import kotlin.test.assertNotNull
import kotlin.test.assertNull
import kotlin.test.assertTrue
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.async
import kotlinx.coroutines.runBlocking

private fun env(name: String): String = System.getenv(name) ?: error("$name is not set: run `cargo xtask kotlin-test`")

private val modelPath = env("MOBILLM_TEST_MODEL")
private val otherModelPath = env("MOBILLM_TEST_OTHER_MODEL")
private val serverUrl = env("MOBILLM_TEST_SERVER")
private val apiKey = env("MOBILLM_TEST_KEY")
private val tmp = File(env("MOBILLM_TEST_TMP"))
private val adminUrl = env("MOBILLM_TEST_ADMIN_URL")
private val adminToken = env("MOBILLM_TEST_ADMIN_TOKEN")

private const val TEMPLATE = "Text: {text}\nIs it pos or neg:"
private val LABELS = listOf("pos", "neg")

/** Texts whose label is carried by their words. */
internal fun examples(n: Int, offset: Int = 0): List<LabeledText> = (offset until offset + n).map { i ->
    if (i % 2 == 0) LabeledText("the pos $i at it", "pos") else LabeledText("on s$i re as", "neg")
}

internal fun options(epochs: UInt = 15u, key: String = apiKey, url: String = serverUrl) = FineTuneOptions(
    serverUrl = url,
    apiKey = key,
    epochs = epochs,
    maxRounds = 2u,
    learningRate = 0.01,
    width = 16u,
    rank = 4u,
    forwardBatch = 8u,
    pollMillis = 20u,
)

private class Recorder : ProgressListener {
    val events: MutableList<FineTuneProgress> = Collections.synchronizedList(mutableListOf())
    val threads: MutableSet<String> = Collections.synchronizedSet(mutableSetOf())
    override fun onProgress(progress: FineTuneProgress) {
        events.add(progress)
        threads.add(Thread.currentThread().name)
    }
}

/** A counter of the assist server's metrics (its admin listener). */
private fun serverCounter(name: String): Long {
    val conn = java.net.URI("$adminUrl/metrics").toURL().openConnection() as java.net.HttpURLConnection
    conn.setRequestProperty("Authorization", "Bearer $adminToken")
    val text = conn.inputStream.bufferedReader().use { it.readText() }
    return text.lines().first { it.startsWith("$name ") }.substringAfter(' ').trim().toDouble().toLong()
}

/** Runs `ResumeDevice.kt` in a JVM of its own until it prints its outcome (`outcome <accuracy> <resumes>
 *  <bytes>`), or kills it with SIGKILL at the first progress event `killAt` matches (then null). */
private fun deviceJvm(state: File, how: String, killAt: ((List<String>) -> Boolean)?): List<String>? {
    val java = File(System.getProperty("java.home"), "bin/java").path
    val process = ProcessBuilder(
        java, "-Djna.library.path=${System.getProperty("jna.library.path")}",
        "-cp", System.getProperty("java.class.path"), "dev.mobillm.ResumeDeviceKt", state.path, how,
    ).redirectError(ProcessBuilder.Redirect.DISCARD).start()
    process.inputStream.bufferedReader().useLines { lines ->
        for (line in lines) {
            val fields = line.split(" ")
            if (fields[0] == "outcome") {
                assertEquals(0, process.waitFor(), "the device JVM's exit status")
                return fields
            }
            if (fields[0] == "event" && killAt != null && killAt(fields)) {
                process.destroyForcibly() // SIGKILL
                process.waitFor(60, TimeUnit.SECONDS)
                return null
            }
        }
    }
    error("the device JVM ended with status ${process.waitFor()} and no outcome")
}

private val backbone by lazy { Backbone.load(modelPath) }
private val task by lazy { Task(backbone, TEMPLATE, LABELS) }

/** One fine-tuned adapter shared by the prediction tests. */
private val trained: FineTuneResult by lazy {
    val session = FineTuneSession(backbone, task)
    session.addExamples(examples(40))
    session.addHeldOut(examples(12, offset = 100))
    runBlocking { session.fineTune(options(), null) }
}

private val tests: List<Pair<String, () -> Unit>> = listOf(
    "loads a tiny GGUF model" to {
        assertEquals(3u, backbone.layers())
        assertEquals(64u, backbone.hiddenSize())
        assertEquals(64, backbone.fingerprint().length)
    },
    "a missing model file is an Io error" to {
        val e = assertFailsWith<MobiLlmException.Io> { Backbone.load(File(tmp, "missing.gguf").path) }
        assertTrue(e.reason.contains("missing.gguf"), e.reason)
    },
    "a truncated model file is an InvalidModel error" to {
        val bytes = File(modelPath).readBytes()
        val cut = File(tmp, "truncated.gguf").apply { writeBytes(bytes.copyOf(bytes.size / 2)) }
        assertFailsWith<MobiLlmException.InvalidModel> { Backbone.load(cut.path) }
    },
    "a template without {text} or clashing labels is an InvalidTask error" to {
        assertFailsWith<MobiLlmException.InvalidTask> { Task(backbone, "no slot here:", LABELS) }
        assertFailsWith<MobiLlmException.InvalidTask> { Task(backbone, TEMPLATE, listOf("pos", "pos")) }
    },
    "an unknown label adds nothing and is an InvalidInput error" to {
        FineTuneSession(backbone, task).use { session ->
            assertEquals(2uL, session.addExamples(examples(2)))
            assertFailsWith<MobiLlmException.InvalidInput> {
                session.addExamples(listOf(LabeledText("fine", "pos"), LabeledText("hmm", "maybe")))
            }
            assertEquals(2uL, session.exampleCount())
        }
    },
    "fine-tunes through the server off the caller's thread, with progress" to {
        val session = FineTuneSession(backbone, task)
        session.addExamples(examples(40))
        session.addHeldOut(examples(12, offset = 100))
        val recorder = Recorder()
        val caller = Thread.currentThread().name
        val result = runBlocking { session.fineTune(options(), recorder) }
        assertEquals(40uL, result.trainSamples)
        assertEquals(12uL, result.testSamples)
        // Too few examples for a validation split: all were sent and both rounds ran.
        assertEquals(0uL, result.validationSamples)
        assertEquals(2u, result.roundsUsed)
        assertEquals(0u, result.refitRounds)
        assertNotNull(result.finetunedAccuracy)
        assertTrue(result.uploadBytes > 0uL)
        val phases = recorder.events.map { it.phase }
        assertTrue(phases.indexOf(FineTunePhase.FORWARD) < phases.indexOf(FineTunePhase.TRAIN), "$phases")
        assertEquals(FineTunePhase.DONE, phases.last())
        assertTrue(recorder.events.any { it.phase == FineTunePhase.TRAIN && it.round == 2u && it.done == 15uL })
        // Progress arrives on the fine-tune's own (native) thread, never on the caller's.
        assertTrue(recorder.threads.isNotEmpty())
        assertTrue(caller !in recorder.threads, "progress on the caller's thread $caller")
    },
    "label noise at ε is reported back, and an ε of zero is an InvalidInput error" to {
        FineTuneSession(backbone, task).use { session ->
            session.addExamples(examples(40))
            val result = runBlocking { session.fineTune(options().copy(labelEpsilon = 8.0), null) }
            assertEquals(8.0, result.labelEpsilon)
            assertNull(trained.labelEpsilon)
            assertFailsWith<MobiLlmException.InvalidInput> {
                runBlocking { session.fineTune(options().copy(labelEpsilon = 0.0), null) }
            }
        }
    },
    "pivots and means: about twice the upload, an adapter that predicts; not an option of mobillm mode" to {
        FineTuneSession(backbone, task).use { session ->
            session.addExamples(examples(40))
            val both = options().copy(summary = LayerSummary.PIVOT_AND_MEAN)
            val result = runBlocking { session.fineTune(both, null) }
            val ratio = result.uploadBytes.toDouble() / trained.uploadBytes.toDouble()
            assertTrue(ratio > 1.5 && ratio < 2.5, "upload ${result.uploadBytes} against ${trained.uploadBytes}")
            assertEquals(LABELS.size, result.adapter.predict(backbone, "good").scores.size)
            assertFailsWith<MobiLlmException.InvalidInput> {
                runBlocking { session.fineTune(both.copy(mode = FineTuneMode.MOBILLM), null) }
            }
        }
    },
    "local mode trains on the device: no server URL, no key, nothing uploaded" to {
        FineTuneSession(backbone, task).use { session ->
            session.addExamples(examples(40))
            session.addHeldOut(examples(12, 100))
            val local = FineTuneOptions(
                mode = FineTuneMode.LOCAL,
                epochs = 15u,
                maxRounds = 2u,
                learningRate = 0.01,
                width = 16u,
                rank = 4u,
                forwardBatch = 8u,
            )
            val recorder = Recorder()
            val result = runBlocking { session.fineTune(local, recorder) }
            assertEquals(0uL, result.uploadBytes)
            assertEquals(0.0, result.serverTrainSeconds)
            assertTrue(result.deviceTrainSeconds > 0.0, "device training took ${result.deviceTrainSeconds} s")
            assertTrue(recorder.events.any { it.phase == FineTunePhase.TRAIN && it.loss != null })
            assertNotNull(result.finetunedAccuracy)
            val texts = examples(40)
            val predictions = result.adapter.predictAll(backbone, texts.map { it.text })
            val pTrue = texts.zip(predictions).map { (e, p) -> p.scores[LABELS.indexOf(e.label)] }.average()
            assertTrue(pTrue > 0.5, "mean probability of the true label $pTrue")
            assertFailsWith<MobiLlmException.InvalidInput> {
                runBlocking { session.fineTune(local.copy(labelEpsilon = 1.0), null) }
            }
        }
    },
    "the adapter predicts every label with probabilities, and moves predictions towards the labels" to {
        val adapter = trained.adapter
        assertEquals(LABELS, adapter.labels())
        val texts = examples(40)
        val predictions = adapter.predictAll(backbone, texts.map { it.text })
        predictions.forEach { p ->
            assertTrue(p.label in LABELS)
            assertEquals(p.label, LABELS[p.labelIndex.toInt()])
            assertEquals(1.0f, p.scores.sum(), 1e-4f)
        }
        val pTrue = texts.zip(predictions).map { (e, p) -> p.scores[LABELS.indexOf(e.label)] }.average()
        assertTrue(pTrue > 0.5, "mean probability of the true label $pTrue")
    },
    "an adapter saved and loaded predicts the same" to {
        val file = File(tmp, "adapter.safetensors")
        trained.adapter.save(file.path)
        Adapter.load(file.path).use { loaded ->
            val text = "the pos 7 at it"
            assertEquals(trained.adapter.predict(backbone, text), loaded.predict(backbone, text))
            assertEquals(backbone.fingerprint(), loaded.backboneFingerprint())
        }
        File(tmp, "garbage.safetensors").writeText("not an adapter")
        assertFailsWith<MobiLlmException.InvalidModel> { Adapter.load(File(tmp, "garbage.safetensors").path) }
    },
    "an adapter sealed with the app's key opens only with that key" to {
        val file = File(tmp, "adapter.sealed")
        val key = ByteArray(32) { it.toByte() }
        trained.adapter.save(file.path, key)
        assertFailsWith<MobiLlmException.InvalidModel> { Adapter.load(file.path) }
        assertFailsWith<MobiLlmException.InvalidModel> { Adapter.load(file.path, ByteArray(32) { 7 }) }
        Adapter.load(file.path, key).use { loaded ->
            val text = "the pos 7 at it"
            assertEquals(trained.adapter.predict(backbone, text), loaded.predict(backbone, text))
        }
    },
    "an adapter refuses a backbone it was not trained on" to {
        Backbone.load(otherModelPath).use { other ->
            assertFailsWith<MobiLlmException.InvalidInput> { trained.adapter.predict(other, "the pos 1 at it") }
        }
    },
    "cancelling from another thread ends the fine-tune with Cancelled" to {
        val session = FineTuneSession(backbone, task)
        session.addExamples(examples(40))
        val handle = session.cancelHandle()
        val listener = object : ProgressListener {
            override fun onProgress(progress: FineTuneProgress) {
                if (progress.phase == FineTunePhase.TRAIN && progress.done >= 1uL) thread { handle.cancel() }
            }
        }
        assertFailsWith<MobiLlmException.Cancelled> { runBlocking { session.fineTune(options(epochs = 1000u), listener) } }
        assertTrue(handle.isCancelled())
    },
    "a JVM killed mid-upload, while the server trains, between rounds or in the refit resumes in a new JVM" to {
        val state = File(tmp, "resume.state")
        val whole = assertNotNull(deviceJvm(state, "fresh", null))
        assertTrue(!state.exists(), "a finished fine-tune removes its state")
        val points = listOf<Pair<String, (List<String>) -> Boolean>>(
            "mid-upload" to { f -> f[1] == "FORWARD" && f[4].toLong() > 0 && f[3].toLong() * 4 >= f[4].toLong() * 3 },
            "while the server trains" to { f -> f[1] == "TRAIN" && f[2] == "1" },
            "between rounds" to { f -> f[1] == "TARGETS" && f[2] == "2" },
            "in the refit" to { f -> f[1] == "REFIT" && f[2] == "1" && f[3].toLong() >= 1 },
        )
        for ((point, killAt) in points) {
            val stored = serverCounter("mobillm_samples_stored_total")
            val duplicates = serverCounter("mobillm_samples_duplicate_total")
            assertNull(deviceJvm(state, "fresh", killAt), "$point: killed")
            assertTrue(state.exists(), "$point: the state outlives the JVM")
            val resumed = assertNotNull(deviceJvm(state, "resume", null))
            val sentAgain = serverCounter("mobillm_samples_duplicate_total") - duplicates
            println("        $point: $sentAgain samples sent again, accuracy ${resumed[1]} (uninterrupted ${whole[1]})")
            // The 360 sent, then the 40 held back for validation, sent for the refit.
            assertEquals(400L, serverCounter("mobillm_samples_stored_total") - stored, "$point: each sample stored once")
            // Only a frame in flight at the kill (stored, its answer lost) may go again; after the upload, nothing.
            if (point == "mid-upload") assertTrue(sentAgain <= 64, "$point: $sentAgain") else assertEquals(0L, sentAgain)
            assertEquals("1", resumed[2], "$point: resumed once")
            assertTrue(resumed[1].toDouble() >= whole[1].toDouble() - 0.15, "$point: ${resumed[1]} vs ${whole[1]}")
            assertTrue(!state.exists(), "$point: finished and cleaned up")
        }
    },
    "a detached fine-tune resumes later in the same JVM; a changed example is CannotResume" to {
        val state = File(tmp, "detach.state")
        val session = resumableSession(backbone, task)
        val handle = session.cancelHandle()
        val key = ByteArray(32) { 5 }
        val options = resumableOptions(state.path).copy(stateKey = key)
        val detacher = object : ProgressListener {
            override fun onProgress(progress: FineTuneProgress) {
                if (progress.phase == FineTunePhase.TRAIN) handle.detach()
            }
        }
        val e = assertFailsWith<MobiLlmException.Detached> { runBlocking { session.fineTune(options, detacher) } }
        assertEquals(state.path, e.statePath)
        assertTrue(e.expiresInSeconds > 0uL, "${e.expiresInSeconds}")
        assertTrue(state.exists())
        val changed = resumableSession(backbone, task)
        changed.addExamples(listOf(LabeledText("one more", "pos")))
        assertFailsWith<MobiLlmException.CannotResume> { runBlocking { changed.resume(state.path, options, null) } }
        assertFailsWith<MobiLlmException.CannotResume> {
            runBlocking { session.resume(state.path, options.copy(stateKey = ByteArray(32) { 6 }), null) }
        }
        val stored = serverCounter("mobillm_samples_stored_total")
        val result = runBlocking { session.resume(state.path, options, null) }
        assertEquals(1u, result.resumes)
        assertEquals(stored + 40, serverCounter("mobillm_samples_stored_total"), "nothing sent again; the split once")
        assertEquals(result.keptRound, result.refitRounds, "the refit ran the rounds the split chose")
        assertTrue(result.finetunedAccuracy!! > result.zeroShotAccuracy!!)
        assertTrue(!state.exists())
    },
    "a wrong API key is a Server error with status 401" to {
        val session = FineTuneSession(backbone, task)
        session.addExamples(examples(4))
        val e = assertFailsWith<MobiLlmException.Server> { runBlocking { session.fineTune(options(key = "nope"), null) } }
        assertEquals(401.toUShort(), e.status)
    },
    "an unreachable server is a Network error" to {
        val session = FineTuneSession(backbone, task)
        session.addExamples(examples(4))
        assertFailsWith<MobiLlmException.Network> {
            runBlocking { session.fineTune(options(url = "http://127.0.0.1:9"), null) }
        }
    },
    "a second fine-tune of a running session is refused" to {
        val session = FineTuneSession(backbone, task)
        session.addExamples(examples(40))
        val handle = session.cancelHandle()
        runBlocking {
            val first = async(Dispatchers.Default) { runCatching { session.fineTune(options(epochs = 1000u), null) } }
            Thread.sleep(300)
            assertFailsWith<MobiLlmException.InvalidInput> { session.fineTune(options(), null) }
            handle.cancel()
            assertTrue(first.await().exceptionOrNull() is MobiLlmException.Cancelled)
        }
    },
    "closed objects refuse further calls" to {
        val adapter = Adapter.load(File(tmp, "adapter.safetensors").path)
        adapter.close()
        assertFailsWith<IllegalStateException> { adapter.labels() }
    },
    "several threads predict at once with the same objects" to {
        val texts = examples(16).map { it.text }
        val expected = trained.adapter.predictAll(backbone, texts)
        val pool = Executors.newFixedThreadPool(4)
        val futures = texts.indices.map { i -> pool.submit<Prediction> { trained.adapter.predict(backbone, texts[i]) } }
        val got = futures.map { it.get(60, TimeUnit.SECONDS) }
        pool.shutdown()
        got.zip(expected).forEach { (g, e) ->
            assertEquals(e.label, g.label)
            g.scores.zip(e.scores).forEach { (a, b) -> assertEquals(b, a, 1e-4f) }
        }
    },
)

fun main() {
    var passed = 0
    var failed = 0
    for ((name, test) in tests) {
        try {
            test()
            passed++
            println("ok      $name")
        } catch (t: Throwable) {
            failed++
            println("FAILED  $name: $t")
            t.printStackTrace(System.out)
        }
    }
    println("$passed passed, $failed failed")
    exitProcess(if (failed == 0) 0 else 1)
}
