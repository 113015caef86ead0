package dev.mobillm.example

import android.net.Uri
import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.ProgressBar
import android.widget.TextView
import androidx.activity.result.contract.ActivityResultContracts
import androidx.appcompat.app.AppCompatActivity
import androidx.lifecycle.Lifecycle
import androidx.lifecycle.lifecycleScope
import androidx.lifecycle.repeatOnLifecycle
import androidx.work.BackoffPolicy
import androidx.work.Constraints
import androidx.work.ExistingWorkPolicy
import androidx.work.NetworkType
import androidx.work.OneTimeWorkRequestBuilder
import androidx.work.WorkInfo
import androidx.work.WorkManager
import androidx.work.workDataOf
import dev.mobillm.Adapter
import dev.mobillm.Backbone
import dev.mobillm.MobiLlmException
import java.io.File
import java.util.UUID
import java.util.concurrent.TimeUnit
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext

/**
 * Pick a GGUF model and a JSONL file of {"text","label"} lines, fine-tune through an assist server with a
 * progress bar, then classify new text. The texts and labels never leave the phone: only rotated, quantised
 * activations and rotated targets do (see the repository README).
 *
 * The fine-tune runs as WorkManager work ([FineTuneWorker]), resumable: it goes on when the activity is closed,
 * and after the process is killed or the network drops it resumes from its last acknowledged step.
 */
class MainActivity : AppCompatActivity() {
    private var backbone: Backbone? = null
    private var adapter: Adapter? = null
    private var shownResult: UUID? = null

    private val pickModel = registerForActivityResult(ActivityResultContracts.OpenDocument()) { uri ->
        uri?.let { loadModel(it) }
    }
    private val pickData = registerForActivityResult(ActivityResultContracts.OpenDocument()) { uri ->
        uri?.let { fineTune(it) }
    }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        findViewById<Button>(R.id.pickModel).setOnClickListener { pickModel.launch(arrayOf("*/*")) }
        findViewById<Button>(R.id.pickData).setOnClickListener { pickData.launch(arrayOf("*/*")) }
        findViewById<Button>(R.id.cancel).setOnClickListener {
            lifecycleScope.launch { FineTuneWorker.cancel(applicationContext) }
        }
        findViewById<Button>(R.id.predict).setOnClickListener { predict() }
        lifecycleScope.launch {
            // The model and adapter of an earlier run, from private storage.
            val (savedModel, savedAdapter) = withContext(Dispatchers.IO) { loadSavedModel() to loadAdapter() }
            backbone = backbone ?: savedModel
            adapter = savedAdapter
            findViewById<Button>(R.id.predict).isEnabled = backbone != null && adapter != null
            // The fine-tune's state while the activity is visible; it runs on without it.
            repeatOnLifecycle(Lifecycle.State.STARTED) {
                WorkManager.getInstance(applicationContext)
                    .getWorkInfosForUniqueWorkFlow(FineTuneWorker.WORK_NAME)
                    .collect { infos -> show(infos.lastOrNull()) }
            }
        }
    }

    private fun status(text: String) = findViewById<TextView>(R.id.status).setText(text)

    private fun loadSavedModel(): Backbone? {
        val file = File(filesDir, FineTuneWorker.MODEL_FILE)
        if (!file.exists()) return null
        return try {
            Backbone.load(file.path)
        } catch (e: MobiLlmException) {
            null
        }
    }

    private fun loadAdapter(): Adapter? {
        val file = File(filesDir, FineTuneWorker.ADAPTER_FILE)
        if (!file.exists()) return null
        return try {
            Adapter.load(file.path, Keys.get(applicationContext, "adapter"))
        } catch (e: MobiLlmException) {
            null
        }
    }

    private fun loadModel(uri: Uri) = lifecycleScope.launch {
        status("Loading the model…")
        try {
            backbone = withContext(Dispatchers.IO) {
                // The backbone is memory-mapped from a file: copy the picked document into app storage once. The
                // worker loads the same file.
                val file = File(filesDir, FineTuneWorker.MODEL_FILE)
                contentResolver.openInputStream(uri)!!.use { input -> file.outputStream().use { input.copyTo(it) } }
                Backbone.load(file.path)
            }
            status("Model loaded (${backbone!!.layers()} layers)")
            findViewById<Button>(R.id.predict).isEnabled = adapter != null
        } catch (e: MobiLlmException) {
            status("Cannot load the model: ${e.message}")
        }
    }

    private fun fineTune(uri: Uri) = lifecycleScope.launch {
        if (backbone == null) return@launch status("Pick the model first")
        // The worker reads the examples from app storage on every attempt (the picked document may be gone
        // after a restart): copy them once.
        withContext(Dispatchers.IO) {
            val file = File(filesDir, FineTuneWorker.EXAMPLES_FILE)
            contentResolver.openInputStream(uri)!!.use { input -> file.outputStream().use { input.copyTo(it) } }
        }
        // WorkManager keeps the input in the app's private database, API key included. The server URL, key and
        // template must stay the same across attempts (the worker's options): resuming checks them.
        val input = workDataOf(
            FineTuneWorker.KEY_SERVER to findViewById<EditText>(R.id.server).text.toString(),
            FineTuneWorker.KEY_API_KEY to findViewById<EditText>(R.id.apiKey).text.toString(),
            FineTuneWorker.KEY_TEMPLATE to findViewById<EditText>(R.id.template).text.toString(),
        )
        val request = OneTimeWorkRequestBuilder<FineTuneWorker>()
            .setInputData(input)
            .setConstraints(Constraints.Builder().setRequiredNetworkType(NetworkType.CONNECTED).build())
            // A detached attempt is retried after this (growing linearly); the server trains meanwhile.
            .setBackoffCriteria(BackoffPolicy.LINEAR, 30, TimeUnit.SECONDS)
            .build()
        FineTuneWorker.cancelRequested = false
        // KEEP: while a fine-tune is scheduled or running, another tap does not start a second one.
        WorkManager.getInstance(applicationContext)
            .enqueueUniqueWork(FineTuneWorker.WORK_NAME, ExistingWorkPolicy.KEEP, request)
    }

    /** Shows the fine-tune's work: its progress while it runs, its outcome once it is finished. */
    private fun show(info: WorkInfo?) {
        val active = info != null && !info.state.isFinished
        // The model and the examples are the worker's input files: not replaced while it may still read them.
        findViewById<Button>(R.id.pickModel).isEnabled = !active
        findViewById<Button>(R.id.pickData).isEnabled = !active
        findViewById<Button>(R.id.cancel).isEnabled = active
        if (info == null) return
        val progressBar = findViewById<ProgressBar>(R.id.progress)
        when (info.state) {
            WorkInfo.State.RUNNING -> {
                val p = info.progress
                val done = p.getLong(FineTuneWorker.KEY_DONE, 0)
                val total = p.getLong(FineTuneWorker.KEY_TOTAL, 0)
                progressBar.progress = if (total > 0) (done * 1000 / total).toInt() else 0
                val phase = p.getString(FineTuneWorker.KEY_PHASE)
                status(
                    if (phase == null) "Starting (attempt ${info.runAttemptCount + 1})…"
                    else "$phase $done/$total (round ${p.getInt(FineTuneWorker.KEY_ROUND, 0)})",
                )
            }
            WorkInfo.State.ENQUEUED, WorkInfo.State.BLOCKED -> status(
                if (info.runAttemptCount == 0) "Waiting for the network…"
                else "Waiting for attempt ${info.runAttemptCount + 1}; it resumes where the last one stopped",
            )
            WorkInfo.State.SUCCEEDED -> {
                val out = info.outputData
                val resumes = out.getInt(FineTuneWorker.KEY_RESUMES, 0)
                status(
                    "Held-out accuracy ${pct(out.keyValueMap[FineTuneWorker.KEY_ZERO_SHOT] as? Double)} → " +
                        "${pct(out.keyValueMap[FineTuneWorker.KEY_FINETUNED] as? Double)} (resumed $resumes times)",
                )
                progressBar.progress = 1000
                if (shownResult != info.id) {
                    shownResult = info.id
                    lifecycleScope.launch {
                        adapter = withContext(Dispatchers.IO) { loadAdapter() }
                        findViewById<Button>(R.id.predict).isEnabled = adapter != null && backbone != null
                    }
                }
            }
            WorkInfo.State.FAILED ->
                status("Fine-tuning failed: ${info.outputData.getString(FineTuneWorker.KEY_ERROR)}")
            WorkInfo.State.CANCELLED -> status("Cancelled")
        }
    }

    private fun pct(x: Double?) = x?.let { "%.1f%%".format(it * 100) } ?: "n/a"

    private fun predict() = lifecycleScope.launch {
        val backbone = backbone ?: return@launch
        val adapter = adapter ?: return@launch
        val text = findViewById<EditText>(R.id.input).text.toString()
        val p = withContext(Dispatchers.Default) { adapter.predict(backbone, text) }
        val scores = adapter.labels().zip(p.scores).joinToString { (l, s) -> "$l %.2f".format(s) }
        findViewById<TextView>(R.id.prediction).text = "${p.label} ($scores)"
    }
}
