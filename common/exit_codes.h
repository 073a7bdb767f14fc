// Process exit codes of every SpectrumKV program (STYLE.md, BSD sysexits).
#ifndef SPECTRUMKV_COMMON_EXIT_CODES_H_
#define SPECTRUMKV_COMMON_EXIT_CODES_H_

namespace spectrumkv {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;       // runtime failure
inline constexpr int kExitUsage = 64;        // EX_USAGE
inline constexpr int kExitUnavailable = 69;  // EX_UNAVAILABLE: a dependency is missing
inline constexpr int kExitInternal = 70;     // EX_SOFTWARE
inline constexpr int kExitConfig = 78;       // EX_CONFIG

}  // namespace spectrumkv

#endif  // SPECTRUMKV_COMMON_EXIT_CODES_H_
