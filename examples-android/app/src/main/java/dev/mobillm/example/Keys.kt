package dev.mobillm.example

import android.content.Context
import android.security.keystore.KeyGenParameterSpec
import android.security.keystore.KeyProperties
import java.io.File
import java.security.KeyStore
import java.security.SecureRandom
import javax.crypto.Cipher
import javax.crypto.KeyGenerator
import javax.crypto.SecretKey
import javax.crypto.spec.GCMParameterSpec

/**
 * The 32-byte keys that seal the SDK's files (the adapter, the fine-tune's state file). The SDK takes the key's
 * bytes, which the Android Keystore never hands out, so each key is 32 random bytes kept in `filesDir` wrapped
 * (AES-GCM) by a Keystore key that cannot leave the Keystore: a copy of the app's files alone does not open them.
 */
object Keys {
    private const val KEYSTORE = "AndroidKeyStore"
    private const val WRAPPING_KEY = "mobillm-example-wrapping-key"
    private const val IV_BYTES = 12

    /** The key called [name], made on first use. Blocking (Keystore calls): call it off the main thread. */
    @Synchronized
    fun get(context: Context, name: String): ByteArray {
        val file = File(context.filesDir, "$name.key")
        if (file.exists()) {
            val wrapped = file.readBytes()
            val cipher = Cipher.getInstance("AES/GCM/NoPadding")
            cipher.init(Cipher.DECRYPT_MODE, wrappingKey(), GCMParameterSpec(128, wrapped, 0, IV_BYTES))
            return cipher.doFinal(wrapped, IV_BYTES, wrapped.size - IV_BYTES)
        }
        val key = ByteArray(32).also { SecureRandom().nextBytes(it) }
        val cipher = Cipher.getInstance("AES/GCM/NoPadding")
        cipher.init(Cipher.ENCRYPT_MODE, wrappingKey()) // the Keystore picks the IV
        val tmp = File(file.path + ".tmp")
        tmp.writeBytes(cipher.iv + cipher.doFinal(key))
        check(tmp.renameTo(file)) { "cannot write $file" }
        return key
    }

    private fun wrappingKey(): SecretKey {
        val store = KeyStore.getInstance(KEYSTORE).apply { load(null) }
        (store.getKey(WRAPPING_KEY, null) as? SecretKey)?.let { return it }
        val generator = KeyGenerator.getInstance(KeyProperties.KEY_ALGORITHM_AES, KEYSTORE)
        generator.init(
            KeyGenParameterSpec.Builder(WRAPPING_KEY, KeyProperties.PURPOSE_ENCRYPT or KeyProperties.PURPOSE_DECRYPT)
                .setBlockModes(KeyProperties.BLOCK_MODE_GCM)
                .setEncryptionPaddings(KeyProperties.ENCRYPTION_PADDING_NONE)
                .setKeySize(256)
                .build(),
        )
        return generator.generateKey()
    }
}
