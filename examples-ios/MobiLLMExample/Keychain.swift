// The app's secrets in the Keychain: the 32-byte keys that seal the SDK's files (the adapter, the fine-tune's
// state file) and the assist server's API key. Items stay on this device and are readable after the first unlock,
// so a background task can use them while the phone is locked.

import Foundation
import Security

struct KeychainError: Error {
    let status: OSStatus
}

enum Keychain {
    /// The 32-byte key called `name`, made on first use.
    static func key(named name: String) throws -> Data {
        if let key = try read(name) { return key }
        var bytes = [UInt8](repeating: 0, count: 32)
        let status = SecRandomCopyBytes(kSecRandomDefault, bytes.count, &bytes)
        guard status == errSecSuccess else { throw KeychainError(status: status) }
        let key = Data(bytes)
        try write(key, as: name)
        return key
    }

    static func read(_ name: String) throws -> Data? {
        var query = item(name)
        query[kSecReturnData as String] = true
        query[kSecMatchLimit as String] = kSecMatchLimitOne
        var result: CFTypeRef?
        let status = SecItemCopyMatching(query as CFDictionary, &result)
        if status == errSecItemNotFound { return nil }
        guard status == errSecSuccess, let data = result as? Data else { throw KeychainError(status: status) }
        return data
    }

    static func write(_ data: Data, as name: String) throws {
        SecItemDelete(item(name) as CFDictionary)
        var attributes = item(name)
        attributes[kSecValueData as String] = data
        attributes[kSecAttrAccessible as String] = kSecAttrAccessibleAfterFirstUnlockThisDeviceOnly
        let status = SecItemAdd(attributes as CFDictionary, nil)
        guard status == errSecSuccess else { throw KeychainError(status: status) }
    }

    private static func item(_ name: String) -> [String: Any] {
        [
            kSecClass as String: kSecClassGenericPassword,
            kSecAttrService as String: "dev.mobillm.example",
            kSecAttrAccount as String: name,
        ]
    }
}
