/*!
 * \file load_checks.h
 * \brief What is checked before a compiled library from a file or a saved state is opened:
 *        JSON nesting, the ELF image, the host's CPU features, the trust policy (allowed
 *        SHA-256 digests), and the regular files it is read from.
 *
 * A saved module holds native code: dlopen runs it. These checks turn malformed or unsuitable
 * input into a c10::Error instead of a crash (stack overflow, SIGBUS, SIGILL), and let a
 * server refuse any library it was not told to trust, before any of its code runs.
 */
#ifndef TVM_CONTRIB_TORCH_LOAD_CHECKS_H_
#define TVM_CONTRIB_TORCH_LOAD_CHECKS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace tvm_torch {

/*! \brief Deepest JSON nesting accepted in a state header or a graph manifest. */
constexpr int kMaxJsonDepth = 64;

/*!
 * \brief Throw c10::Error if `text` nests arrays/objects deeper than kMaxJsonDepth (checked
 *        without recursion, before the recursive parser sees it).
 */
void CheckJsonDepth(const std::string& text, const char* what);

/*! \brief SHA-256 of bytes, as 64 lowercase hex digits. */
std::string Sha256Hex(const std::string& bytes);

/*!
 * \brief Throw c10::Error unless `image` is a complete ELF shared object for this machine:
 *        header, program and section tables, and every segment inside the bytes (a truncated
 *        library would fault inside dlopen).
 */
void CheckElfImage(const std::string& image);

/*! \brief The features in `required` (LLVM names) this CPU lacks; unknown names are skipped. */
std::vector<std::string> MissingCpuFeatures(const std::vector<std::string>& required);

/*!
 * \brief The trusted SHA-256 digests of compiled libraries, or nullopt when no policy is set
 *        (every library is loaded). Read from $TVM_TORCH_TRUSTED_LIBRARIES on first use
 *        unless set through SetTrustedLibraries.
 */
std::optional<std::vector<std::string>> TrustedLibraries();

/*!
 * \brief Set the policy: the digests to trust (an empty list trusts none), or nullopt to go
 *        back to $TVM_TORCH_TRUSTED_LIBRARIES (no variable: every library is trusted).
 */
void SetTrustedLibraries(std::optional<std::vector<std::string>> digests);

/*! \brief Throw c10::Error if a policy is set and `sha256` is not in it. */
void CheckTrustedLibrary(const std::string& sha256);

/*!
 * \brief Read a whole regular file (never a device, FIFO or directory), at most `max_bytes`;
 *        throws c10::Error naming the file and the reason.
 */
std::string ReadRegularFile(const std::string& path, const char* what,
                            uint64_t max_bytes = uint64_t{1} << 40);

}  // namespace tvm_torch

#endif  // TVM_CONTRIB_TORCH_LOAD_CHECKS_H_
